"""`histcode` commands for pretraining, feature views, SQL and search."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histcode.cli.common import config_of, fail, print_frame, terminal, workspace_of


def pretrain(
    ctx: typer.Context,
    method: Annotated[Optional[str], typer.Option(help="adco | moco | simclr (default: pretrain.method).")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="resnet18 | resnet50 | resnet50_l3 | timm:<name>.")] = None,
    init: Annotated[Optional[str], typer.Option(help="random | imagenet (ImageNet only if the weights are on disk).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Train this many steps (overrides pretrain.epochs).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run of this configuration.")] = False,
    force: Annotated[bool, typer.Option(help="Train again even if this configuration already finished on exactly these tiles.")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/pretrain.json).")] = None,
) -> None:
    """Contrastive pretraining on the catalog's tiles, tracked in MLflow; registers the encoder. A configuration
    that already finished on exactly the current tiles is reused (nothing trained or registered) unless --force."""
    from histcode.apps.pretraining import pretrain_or_reuse
    from histcode.ssl.dataset import NoTilesError
    from histcode.ssl.encoders import EncoderError
    from histcode.ssl.train import TrainingDiverged
    from histcode.store.catalog import CatalogError
    from histcode.tracking import telemetry_off

    telemetry_off()
    ws = workspace_of(ctx)
    cfg = config_of(ws)
    overrides = {k: v for k, v in {"method": method, "encoder": encoder, "init": init, "max_steps": steps}.items()
                 if v is not None}
    if overrides:
        from pydantic import ValidationError

        try:
            cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_validate({**cfg.pretrain.model_dump(), **overrides})})
        except ValidationError as exc:
            fail(str(exc))
    try:
        summary, reused = pretrain_or_reuse(ws, cfg, resume=resume, force=force, report=report)
    except (NoTilesError, EncoderError, TrainingDiverged, ValueError, FileNotFoundError, CatalogError) as exc:
        fail(str(exc))
    if not summary:
        return  # a torchrun process other than rank 0
    from histcode.views import probe_lines

    console = terminal()
    if reused:
        state = "up to date, reused (--force trains again)"
    else:
        state = f"resumed at step {summary['resumed_from_step']}" if summary["resumed_from_step"] is not None else "new run"
    loss = f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a"
    console.print(f"pretrain {summary['method']}: {summary['steps']} steps ({state}), final loss {loss}")
    console.print(f"MLflow run {summary['run_id']}; registered {cfg.pretrain.register_as} version {summary['version']} "
                  f"(models:/{cfg.pretrain.register_as}@{summary['method']})")
    if summary["probe"]:
        console.print(probe_lines(summary["probe"]))


def embed(
    ctx: typer.Context,
    encoder: Annotated[Optional[str], typer.Option(help="Registered encoder: name@alias, name/version or name (latest); default features.encoder.")] = None,
    slide: Annotated[Optional[list[str]], typer.Option("--slide", help="Only these slide ids (repeatable).")] = None,
    tag: Annotated[Optional[str], typer.Option(help="Tag the resulting table versions (for training and --as-of).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/embed.json).")] = None,
    recheck: Annotated[bool, typer.Option("--recheck", help="Compare the vector tables with the catalog's ledger slide by slide (not only their totals) and embed again what they lack.")] = False,
) -> None:
    """Materialise the feature view of an encoder: tile and slide vectors into LanceDB. Slides the ledger records
    but the tables lack (a deleted table, a restored older copy) are named and embedded again. Exits 1 if a
    slide failed."""
    from histcode.features.embed import materialize
    from histcode.features.registry import ViewError
    from histcode.reports import embed_summary
    from histcode.store.files import write_json
    from histcode.ssl.dataset import NoTilesError
    from histcode.store.catalog import CatalogError
    from histcode.store.vectors import VectorStoreError
    from histcode.tracking import telemetry_off
    from histcode.views import embed_table

    telemetry_off()
    ws = workspace_of(ctx)
    cfg = config_of(ws)
    try:
        result = materialize(ws, cfg, encoder=encoder, slide_ids=slide, tag=tag, recheck=recheck)
    except (ViewError, NoTilesError, CatalogError, VectorStoreError) as exc:
        fail(str(exc))
    terminal().print(embed_table(result))  # disagreements with the ledger, and their repair, are logged as warnings
    write_json(report or ws.metrics_dir / "embed.json", embed_summary(result))
    if result.failed:
        raise typer.Exit(1)


def sql(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="One read-only SQL query (SELECT).")],
    output: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
    limit: Annotated[int, typer.Option(help="Rows to print in table format.")] = 50,
    wide: Annotated[bool, typer.Option("--wide", help="Show long values whole (cells wrap).")] = False,
    view: Annotated[Optional[str], typer.Option(help="Feature view behind tile_embeddings / slide_embeddings (default: features.encoder's view).")] = None,
    time_limit: Annotated[float, typer.Option("--time-limit", help="Seconds the query may run before it is stopped.")] = 30.0,
    memory_limit: Annotated[str, typer.Option("--memory-limit", help="Memory DuckDB may use for the query (512MB, 4GB, ...).")] = "4GB",
    threads: Annotated[int, typer.Option("--threads", help="DuckDB threads (0: the cores, at most 4).")] = 0,
) -> None:
    """Read-only SQL over the catalog and every feature view (tile_embeddings, slide_embeddings, ...), stopped
    with a reason past its time or memory limit."""
    from histcode.errors import UsageError
    from histcode.store.catalog import CatalogError
    from histcode.store.sql import QueryError, SqlLimits, run_sql
    from histcode.store.vectors import VectorStoreError
    from histcode.views import arrow_table

    ws = workspace_of(ctx)
    try:
        limits = SqlLimits(time_limit, memory_limit, threads)
    except UsageError as exc:
        fail(str(exc))
    default = None
    if "_embeddings" in query or view:
        default = _view_or_note(ws, view)
    try:
        result = run_sql(ws, query, default.view_id if default else None, limits)
    except (QueryError, CatalogError, VectorStoreError) as exc:  # QueryError: DuckDB's own (syntax, unknown
        fail(str(exc))  # column), refusals, limits; VectorStoreError: a table the ledger needs is missing or short
    print_frame(result, output, limit, lambda t, n: arrow_table(t, n, wide))


def search(
    ctx: typer.Context,
    slide: Annotated[str | None, typer.Option("--slide", help="Slides like this slide.")] = None,
    tile: Annotated[str | None, typer.Option("--tile", help="Tiles like this tile.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Tiles like this image (embedded by the view's encoder).")] = None,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Score slide retrieval over the cohort instead: leave-one-patient-out MV@1/3/5, mMV@k, mAP@k, logged to MLflow ('retrieval').")] = False,
    by: Annotated[str, typer.Option("--by", help="With --evaluate: the label, a slide column (subtype, sample_type) or 'tissue' (normal / the tumour's subtype).")] = "tissue",
    k: Annotated[int | None, typer.Option("--k", help="How many neighbours (default 10; 5 with --evaluate).")] = None,
    centring: Annotated[str | None, typer.Option("--centring", help="Slide search and --evaluate: 'mean' subtracts the view's mean slide vector before cosine (default), 'none' ranks raw vectors.")] = None,
    pooling: Annotated[str | None, typer.Option("--pooling", help="Slide search and --evaluate: 'mean' of the tiles (default) or 'attention' (weighted by the registered tumour head's attention on this view).")] = None,
    attention_from: Annotated[str | None, typer.Option("--attention-from", help="With --pooling attention: 'final', the registered head's attention (slide search's default), or 'out_of_fold', each slide's attention from the cross-validation fold that never saw its patient (--evaluate's default: scoring with the final head would be in-sample).")] = None,
    where: Annotated[str | None, typer.Option(help="SQL filter on the table's columns, e.g. \"subtype = 'LUSC'\".")] = None,
    as_of: Annotated[str | None, typer.Option("--as-of", help="A table version number or tag.")] = None,
    view: Annotated[str | None, typer.Option(help="Feature view id (default: features.encoder's view under the current tiling).")] = None,
    output: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
    wide: Annotated[bool, typer.Option("--wide", help="Show long ids whole (cells wrap).")] = False,
) -> None:
    """Similarity search: ranked slides or tiles with cosine distances and metadata; --evaluate scores slide retrieval."""
    from histcode.apps.slide_vectors import POOLINGS, PoolingError, slide_vectors
    from histcode.features.registry import ViewError, resolve_view
    from histcode.features.retrieval import CENTRINGS
    from histcode.features.search import SearchError
    from histcode.features.search import search as run_search
    from histcode.store.catalog import Catalog
    from histcode.store.vectors import VectorStoreError
    from histcode.tracking import Tracker, telemetry_off
    from histcode.views import arrow_table

    if centring is not None and centring not in CENTRINGS:
        fail(f"--centring must be one of {', '.join(CENTRINGS)}, not {centring!r}")
    if centring is not None and not evaluate and slide is None:
        fail("--centring applies to slide search (--slide) and --evaluate; tile search ranks raw vectors")
    if pooling is not None and pooling not in POOLINGS:
        fail(f"--pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if pooling is not None and not evaluate and slide is None:
        fail("--pooling applies to slide search (--slide) and --evaluate; tile search ranks tiles")
    if attention_from is not None and pooling != "attention":
        fail("--attention-from applies to --pooling attention")
    if evaluate and any(x is not None for x in (slide, tile, image)):
        fail("--evaluate scores every slide of the cohort; it takes no --slide, --tile or --image")
    telemetry_off()
    ws = workspace_of(ctx)
    cfg = config_of(ws)
    output = "json" if as_json else output
    k = k if k is not None else 5 if evaluate else 10
    try:
        tracker = Tracker(ws)
        fv = resolve_view(Catalog.of(ws), tracker, cfg, view)
        say_view(fv)
        source = attention_from or ("out_of_fold" if evaluate else "final")
        pooled = (slide_vectors(ws, fv, pooling or "mean", as_of, progress=evaluate, source=source)
                  if (evaluate or slide is not None) else None)
        if evaluate:
            _evaluate_retrieval(ws, cfg, tracker, fv, by, k, centring or "mean", pooling or "mean", pooled, where,
                                as_of, output, wide, source if pooling == "attention" else None)
            return
        hits = run_search(ws, fv, cfg.features, slide_id=slide, tile_id=tile, image=image, k=k, where=where, as_of=as_of,
                          centring=centring or "mean", slide_vectors=pooled)
    except (ViewError, SearchError, VectorStoreError, PoolingError, ValueError) as exc:
        fail(str(exc))
    print_frame(hits, output, k, lambda t, n: arrow_table(t, n, wide))


def _evaluate_retrieval(ws, cfg, tracker, fv, by: str, k: int, centring: str, pooling: str, pooled, where, as_of,
                        output: str, wide: bool, source: str | None) -> None:
    """`histcode search --evaluate`: the figures as a table (or CSV/JSON), the MLflow run named on stderr."""
    from histcode.features.retrieval import evaluate_view, log_retrieval
    from histcode.views import arrow_table

    report = evaluate_view(ws, fv, by=by, k=k, centring=centring, cohorts=cfg.cohorts.train, as_of=as_of, where=where,
                           vectors=pooled)
    run_id = log_retrieval(tracker, fv, report, {"as_of": as_of, "where": where, "cohorts": cfg.cohorts.train,
                                                 "pooling": pooling, "attention_source": source})
    table = report.table()
    said = {"out_of_fold": " (out-of-fold attention of the tumour head's cross-validation)",
            "final": " (the final tumour head's attention: in-sample for its training slides)"}.get(source or "", "")
    title = f"retrieval by {by}: leave-one-patient-out, {pooling} pooling{said}, centring {centring}"
    print_frame(table, output, table.num_rows, lambda t, n: arrow_table(t, n, wide, title=title))
    if report.short_queries:
        typer.echo(f"{report.short_queries} query slides had fewer than {k} candidates of other patients", err=True)
    typer.echo(f"MLflow run {run_id} (experiment retrieval)", err=True)


def say_view(view) -> None:
    """Every command that reads vectors names the view on stderr (stdout stays the data)."""
    typer.echo(f"view {view.view_id}: encoder {view.model_name}/{view.model_version} ({view.method}), "
               f"tiling {view.spec_id}", err=True)


def _view_or_note(ws, view_id: str | None):
    """The view behind tile_embeddings / slide_embeddings, named on stderr; None (with the reason) if there is
    none, so that SQL over the catalog alone still runs."""
    from histcode.features.registry import ViewError, resolve_view
    from histcode.store.catalog import Catalog
    from histcode.tracking import Tracker, telemetry_off

    telemetry_off()
    try:
        view = resolve_view(Catalog.of(ws), Tracker(ws), config_of(ws), view_id)
    except ViewError as exc:
        if view_id:
            fail(str(exc))
        typer.echo(f"tile_embeddings / slide_embeddings are not defined: {exc}", err=True)
        return None
    say_view(view)
    return view


COMMANDS = (
    ("pretrain", pretrain),
    ("embed", embed),
    ("sql", sql),
    ("search", search),
)
