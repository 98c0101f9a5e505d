"""The `histcode` command. Each DVC stage is one command here; heavy imports stay inside the commands so
`histcode --help` answers at once."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="HistCode: whole-slide images -> tiles -> contrastive embeddings -> heads, as a feature store.",
)


class State:
    workspace: Optional[Path] = None


def _setup_logging(verbose: int) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=True)], force=True)
    logging.getLogger("histcode").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


@app.callback()
def main_options(
    ctx: typer.Context,
    workspace: Annotated[Optional[Path], typer.Option("--workspace", "-w", help="Workspace directory (default: $HISTCODE_HOME, else the repository root).")] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging (-vv for debug).")] = 0,
) -> None:
    _setup_logging(verbose)
    ctx.obj = State()
    ctx.obj.workspace = workspace


def _ws(ctx: typer.Context):
    from histcode.workspace import Workspace

    return Workspace.resolve(ctx.obj.workspace if ctx.obj else None).ensure()


def _config(ws):
    from histcode.config import ConfigError

    try:
        return ws.config()
    except ConfigError as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 2) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _console():
    from rich.console import Console

    return Console()


@app.command("demo-data")
def demo_data(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option(help="Rebuild even if an identical cohort is present.")] = False,
    workers: Annotated[int, typer.Option(help="Slide-writing processes.")] = 2,
) -> None:
    """Build the demo cohort (real LC25000 tiles, simulated layout, labels and expression) under data/demo."""
    from histcode.demo.build import build_demo_cohort
    from histcode.demo.plan import DemoSourceError

    ws = _ws(ctx)
    cfg = _config(ws).demo
    source = ws.path(cfg.source_dir) if cfg.source_dir else None
    try:
        cohort = build_demo_cohort(cfg, ws.path(cfg.out_dir), source, force=force, workers=workers)
    except (DemoSourceError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    state = "built" if cohort.built else "up to date"
    _console().print(f"demo cohort {state}: {cohort.n_patients} patients, {cohort.n_slides} slides in {cohort.out_dir}")


@app.command()
def ingest(
    ctx: typer.Context,
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Slide files or folders of slides.")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="CSV with path[, slide_id, patient_id, mpp].")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="Microns per pixel for slides whose files carry no usable scale.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/ingest.json).")] = None,
) -> None:
    """Register slides in the catalog. Exits 1 if any slide failed (the others are registered)."""
    from histcode.ingest.run import ingest_sources
    from histcode.ingest.sources import ManifestError, read_manifest, sources_from_paths
    from histcode.reports import ingest_summary, write_json
    from histcode.store.catalog import Catalog, CatalogError
    from histcode.views import ingest_table

    ws = _ws(ctx)
    cfg = _config(ws)
    if not paths and manifest is None:
        _fail("give slide paths or --manifest CSV")
    try:
        sources = read_manifest(manifest, mpp) if manifest else []
    except ManifestError as exc:
        _fail(str(exc))
    sources += sources_from_paths(list(paths or []), cfg.ingest.extensions, mpp)
    if not sources:
        _fail("no slide files found in the given paths")
    try:
        result = ingest_sources(sources, Catalog(ws.catalog_path), cfg.ingest)
    except CatalogError as exc:
        _fail(str(exc))
    _console().print(ingest_table(result))
    summary = ingest_summary(result)
    write_json(report or ws.metrics_dir / "ingest.json", summary)
    if result.failed:
        _console().print(f"[yellow]{len(result.failed)} of {len(result.outcomes)} slides failed; see the reasons above.[/]")
        raise typer.Exit(1)


@app.command()
def tile(
    ctx: typer.Context,
    slide: Annotated[Optional[list[str]], typer.Option("--slide", help="Only these slide ids (repeatable).")] = None,
    force: Annotated[bool, typer.Option(help="Re-tile slides already tiled under this spec.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Retry slides whose last tiling failed.")] = False,
    workers: Annotated[Optional[int], typer.Option(help="Slide processes (default: tiling.workers).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/tiling.json).")] = None,
) -> None:
    """Detect tissue and place the tile grid on every ingested slide. Exits 1 if any slide failed."""
    from histcode.reports import tiling_summary, write_json
    from histcode.store.catalog import Catalog, CatalogError
    from histcode.tiling.run import tile_slides
    from histcode.views import tiling_table

    ws = _ws(ctx)
    cfg = _config(ws).tiling
    if workers is not None:
        cfg = cfg.model_copy(update={"workers": workers})
    catalog = Catalog(ws.catalog_path)
    if not catalog.path.exists():
        _fail(f"no catalog at {catalog.path}: run `histcode ingest` first")
    try:
        result = tile_slides(catalog, cfg, ws.outputs_dir / "qc", slide_ids=slide, force=force, retry_failed=retry_failed)
    except CatalogError as exc:
        _fail(str(exc))
    _console().print(tiling_table(result))
    write_json(report or ws.metrics_dir / "tiling.json", tiling_summary(result))
    _console().print(f"QC pictures: {ws.outputs_dir / 'qc' / result.spec_id}")
    if result.failed:
        raise typer.Exit(1)


@app.command()
def pretrain(
    ctx: typer.Context,
    method: Annotated[Optional[str], typer.Option(help="adco | moco | simclr (default: pretrain.method).")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="resnet18 | resnet50 | resnet50_l3 | timm:<name>.")] = None,
    init: Annotated[Optional[str], typer.Option(help="random | imagenet (ImageNet only if the weights are on disk).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Train this many steps (overrides pretrain.epochs).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run of this configuration.")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/pretrain.json).")] = None,
) -> None:
    """Contrastive pretraining on the catalog's tiles, tracked in MLflow; registers the encoder."""
    from histcode.ssl.dataset import NoTilesError
    from histcode.ssl.encoders import EncoderError
    from histcode.ssl.pretrain import pretrain as run_pretrain
    from histcode.ssl.train import TrainingDiverged
    from histcode.tracking import telemetry_off

    telemetry_off()
    ws = _ws(ctx)
    cfg = _config(ws)
    overrides = {k: v for k, v in {"method": method, "encoder": encoder, "init": init, "max_steps": steps}.items()
                 if v is not None}
    if overrides:
        from pydantic import ValidationError

        try:
            cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_validate({**cfg.pretrain.model_dump(), **overrides})})
        except ValidationError as exc:
            _fail(str(exc))
    try:
        result = run_pretrain(ws, cfg, resume=resume)
    except (NoTilesError, EncoderError, TrainingDiverged, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    console = _console()
    if result.run_id is None:
        return  # a torchrun process other than rank 0
    from histcode.reports import pretrain_summary, write_json

    write_json(report or ws.metrics_dir / "pretrain.json", pretrain_summary(result, cfg.pretrain))
    state = f"resumed at step {result.start_step}" if result.resumed else "new run"
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    console.print(f"pretrain {result.method}: {result.steps} steps ({state}), final loss {loss}")
    console.print(f"MLflow run {result.run_id}; registered {cfg.pretrain.register_as} version {result.version} "
                  f"(models:/{cfg.pretrain.register_as}@{result.method})")
    if result.probe:
        p = result.probe
        console.print(
            f"linear probe on {int(p['probe_tiles'])} held-aside tiles, accuracy / macro AUC: "
            f"trained {p['probe_accuracy']:.3f} / {p['probe_macro_auc']:.3f}, "
            f"random init {p['probe_random_init_accuracy']:.3f} / {p['probe_random_init_macro_auc']:.3f}, "
            f"colour only {p['probe_colour_accuracy']:.3f} / {p['probe_colour_macro_auc']:.3f}"
        )


@app.command()
def embed(
    ctx: typer.Context,
    encoder: Annotated[Optional[str], typer.Option(help="Registered encoder: name@alias, name/version or name (latest); default features.encoder.")] = None,
    slide: Annotated[Optional[list[str]], typer.Option("--slide", help="Only these slide ids (repeatable).")] = None,
    tag: Annotated[Optional[str], typer.Option(help="Tag the resulting table versions (for training and --as-of).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/embed.json).")] = None,
) -> None:
    """Materialise the feature view of an encoder: tile and slide vectors into LanceDB. Exits 1 if a slide failed."""
    from histcode.features.embed import materialize
    from histcode.features.registry import ViewError
    from histcode.reports import embed_summary, write_json
    from histcode.ssl.dataset import NoTilesError
    from histcode.store.catalog import CatalogError
    from histcode.store.vectors import VectorStoreError
    from histcode.tracking import telemetry_off
    from histcode.views import embed_table

    telemetry_off()
    ws = _ws(ctx)
    cfg = _config(ws)
    try:
        result = materialize(ws, cfg, encoder=encoder, slide_ids=slide, tag=tag)
    except (ViewError, NoTilesError, CatalogError, VectorStoreError) as exc:
        _fail(str(exc))
    _console().print(embed_table(result))
    write_json(report or ws.metrics_dir / "embed.json", embed_summary(result))
    if result.failed:
        raise typer.Exit(1)


@app.command()
def sql(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="One read-only SQL query (SELECT).")],
    output: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
    limit: Annotated[int, typer.Option(help="Rows to print in table format.")] = 50,
) -> None:
    """Read-only SQL over the catalog and every feature view (tile_embeddings, slide_embeddings, ...)."""
    from histcode.store.catalog import CatalogError
    from histcode.store.sql import ReadOnlyQueryError, run_sql
    from histcode.views import arrow_table

    ws = _ws(ctx)
    try:
        result = run_sql(ws, query)
    except ReadOnlyQueryError as exc:
        _fail(str(exc))
    except CatalogError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 -- DuckDB's own errors (syntax, unknown column) are the user's to read
        _fail(f"{type(exc).__name__}: {exc}")
    _print_frame(result, output, limit, arrow_table)


@app.command()
def search(
    ctx: typer.Context,
    slide: Annotated[Optional[str], typer.Option("--slide", help="Slides like this slide.")] = None,
    tile: Annotated[Optional[str], typer.Option("--tile", help="Tiles like this tile.")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="Tiles like this image (embedded by the view's encoder).")] = None,
    k: Annotated[int, typer.Option("--k", help="How many neighbours.")] = 10,
    where: Annotated[Optional[str], typer.Option(help="SQL filter on the table's columns, e.g. \"subtype = 'LUSC'\".")] = None,
    as_of: Annotated[Optional[str], typer.Option("--as-of", help="A table version number or tag.")] = None,
    view: Annotated[Optional[str], typer.Option(help="Feature view id (default: the latest materialised).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """Similarity search: ranked slides or tiles with cosine distances and metadata."""
    from histcode.features.registry import ViewError, load_view
    from histcode.features.search import SearchError
    from histcode.features.search import search as run_search
    from histcode.store.catalog import Catalog
    from histcode.store.vectors import VectorStoreError
    from histcode.tracking import telemetry_off
    from histcode.views import arrow_table

    telemetry_off()
    ws = _ws(ctx)
    cfg = _config(ws)
    try:
        fv = load_view(Catalog(ws.catalog_path), view, cfg.features.attribute_columns)
        hits = run_search(ws, fv, cfg.features, slide_id=slide, tile_id=tile, image=image, k=k, where=where, as_of=as_of)
    except (ViewError, SearchError, VectorStoreError, ValueError) as exc:
        _fail(str(exc))
    _print_frame(hits, "json" if as_json else "table", k, arrow_table)


def _print_frame(table, output: str, limit: int, render) -> None:
    if output == "csv":
        sys.stdout.write(table.to_pandas().to_csv(index=False))
    elif output == "json":
        sys.stdout.write(table.to_pandas().to_json(orient="records", lines=True, double_precision=6))
    elif output == "table":
        _console().print(render(table, limit))
    else:
        _fail(f"--format must be table, csv or json, not {output!r}")


@app.command()
def slides(
    ctx: typer.Context,
    status: Annotated[Optional[str], typer.Option(help="Only slides with this status (ok, failed).")] = None,
) -> None:
    """List the slides in the catalog with their status and tiling."""
    from histcode.store.catalog import Catalog
    from histcode.views import catalog_table

    from histcode.store.catalog import CatalogError

    ws = _ws(ctx)
    try:
        _console().print(catalog_table(Catalog(ws.catalog_path), status))
    except CatalogError as exc:
        _fail(str(exc))


@app.command()
def demo(
    ctx: typer.Context,
    workers: Annotated[int, typer.Option(help="Processes for writing the demo slides.")] = 2,
) -> None:
    """Run the whole pipeline on the demo cohort with the workspace's params.yaml."""
    from histcode.demo.pipeline import run_demo
    from histcode.tracking import telemetry_off
    from histcode.views import ingest_table, next_steps, tiling_table

    telemetry_off()
    ws = _ws(ctx)
    cfg = _config(ws)
    outcome = run_demo(ws, cfg, workers=workers)
    console = _console()
    if outcome.ingest.failed:
        console.print(ingest_table(outcome.ingest))
    console.print(tiling_table(outcome.tiling))
    console.print(next_steps(ws, outcome), soft_wrap=True)
    if outcome.failed:
        raise typer.Exit(1)


@app.command()
def heads(
    ctx: typer.Context,
    task: Annotated[Optional[list[str]], typer.Option("--task", help="tumor | subtype | de (repeatable; default heads.tasks).")] = None,
    aggregator: Annotated[Optional[list[str]], typer.Option("--aggregator", help="attention | mean | max (repeatable).")] = None,
    view: Annotated[Optional[str], typer.Option(help="Feature view id (default: heads.view, else the latest).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/heads.json).")] = None,
) -> None:
    """Cross-validate and register the heads (only after the label gate passed)."""
    from histcode.features.registry import ViewError
    from histcode.heads.run import train_heads
    from histcode.labels.run import LabelGateError
    from histcode.reports import write_json
    from histcode.tracking import telemetry_off
    from histcode.views import heads_table

    telemetry_off()
    ws = _ws(ctx)
    cfg = _config(ws)
    try:
        result = train_heads(ws, cfg, tuple(task) if task else None, tuple(aggregator) if aggregator else None, view)
    except (LabelGateError, ViewError, ValueError) as exc:
        _fail(str(exc))
    summary = result.summary()
    write_json(report or ws.metrics_dir / "heads.json", summary)
    _console().print(heads_table(summary))


labels_app = typer.Typer(no_args_is_help=True, help="Expression labels: ingest, DE labelling, the gate.")
app.add_typer(labels_app, name="labels")


@labels_app.command("ingest")
def labels_ingest(
    ctx: typer.Context,
    file: Annotated[Optional[Path], typer.Argument(help="Genes x samples matrix (TSV, CSV, parquet); default labels.expression.")] = None,
    sample_sheet: Annotated[Optional[Path], typer.Option(help="CSV sample_id, patient_id[, slide_id, sample_type].")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/labels.json).")] = None,
) -> None:
    """Read an expression matrix, map samples to slides, compute DE labels and slide labels, plan the folds."""
    from histcode.labels.expression import ExpressionFileError
    from histcode.labels.run import ingest_labels
    from histcode.reports import labels_summary, write_json
    from histcode.store.catalog import CatalogError

    ws = _ws(ctx)
    cfg = _config(ws)
    try:
        result = ingest_labels(ws, cfg, file, sample_sheet)
    except (ExpressionFileError, CatalogError) as exc:
        _fail(str(exc))
    summary = labels_summary(result)
    write_json(report or ws.metrics_dir / "labels.json", summary)
    console = _console()
    console.print(f"label set {result.label_version}: {result.n_samples} samples, {result.n_genes} genes, "
                  f"{result.n_patients} patients; DE classes {result.de_counts}; references {result.references}")
    for gene, reason in result.excluded_genes.items():
        console.print(f"  [yellow]excluded[/] {gene}: {reason}")
    for sample, problem in result.problems.items():
        console.print(f"  [red]sample[/] {sample}: {problem}")
    console.print("next: `histcode labels gate`")


@labels_app.command("gate")
def labels_gate(
    ctx: typer.Context,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/label_gate.json).")] = None,
) -> None:
    """Validate the current label set with Great Expectations; exits 1 (and nothing may train) if it fails."""
    from histcode.labels.run import LabelGateError, gate_labels
    from histcode.reports import gate_summary, write_json

    ws = _ws(ctx)
    cfg = _config(ws)
    try:
        result = gate_labels(ws, cfg)
    except (LabelGateError, FileNotFoundError) as exc:
        _fail(str(exc))
    write_json(report or ws.metrics_dir / "label_gate.json", gate_summary(result))
    console = _console()
    console.print(("[green]" if result.passed else "[red]") + result.summary() + "[/]", soft_wrap=True)
    for gene, reason in result.excluded_genes.items():
        console.print(f"  excluded from DE classification: {gene}: {reason}")
    if result.docs:
        console.print(f"Data Docs: {result.docs}")
    if not result.passed:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
