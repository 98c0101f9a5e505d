"""`histcode` commands for labels, heads, heatmaps, predictions and the ablation. Registered on the app of ``histcode.cli``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histcode.cli import _config, _console, _fail, _ws, app

@app.command()
def heads(
    ctx: typer.Context,
    task: Annotated[Optional[list[str]], typer.Option("--task", help="tumor | subtype | de (repeatable; default heads.tasks).")] = None,
    aggregator: Annotated[Optional[list[str]], typer.Option("--aggregator", help="attention | mean | max (repeatable).")] = None,
    view: Annotated[Optional[str], typer.Option(help="Feature view id (default: heads.view, else the latest).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/heads.json).")] = None,
    plots: Annotated[Optional[Path], typer.Option(help="Folder for ROC and per-gene CSVs (default: metrics/plots).")] = None,
) -> None:
    """Cross-validate and register the heads (only after the label gate passed)."""
    from histcode.features.registry import ViewError
    from histcode.heads.run import train_heads
    from histcode.labels.run import LabelGateError
    from histcode.reports import write_heads_report
    from histcode.tracking import telemetry_off
    from histcode.views import heads_table

    telemetry_off()
    ws = _ws(ctx)
    cfg = _config(ws)
    try:
        result = train_heads(ws, cfg, tuple(task) if task else None, tuple(aggregator) if aggregator else None, view)
    except (LabelGateError, ViewError, ValueError) as exc:
        _fail(str(exc))
    summary = write_heads_report(result, report or ws.metrics_dir / "heads.json", plots or ws.metrics_dir / "plots")
    _console().print(heads_table(summary))


@app.command()
def heatmap(
    ctx: typer.Context,
    slide: Annotated[str, typer.Argument(help="Slide id.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for the PNGs (default: outputs/heatmaps).")] = None,
    gene: Annotated[Optional[list[str]], typer.Option("--gene", help="Genes to map (repeatable; default: the first two).")] = None,
    alias: Annotated[str, typer.Option(help="Tumour-head alias whose attention is drawn.")] = "attention",
    force: Annotated[bool, typer.Option(help="Draw again even if these heads already drew this slide here.")] = False,
) -> None:
    """Attention and gene-specific tile scores over the slide; AUC against its ground-truth mask if known."""
    from histcode.heads.heatmaps import render_heatmaps
    from histcode.tracking import telemetry_off

    telemetry_off()
    ws = _ws(ctx)
    try:
        result = render_heatmaps(ws, slide, out or ws.outputs_dir / "heatmaps", gene, alias, force=force)
    except LookupError as exc:
        _fail(str(exc))
    console = _console()
    for picture in result.pictures:
        console.print(f"heatmap: {picture}")
    if result.mask_auc is not None:
        console.print(f"attention vs ground-truth tumour mask: AUC {result.mask_auc:.3f}")
    console.print(f"{len(result.scores)} tile scores stored: histcode sql \"SELECT * FROM tile_scores WHERE slide_id = '{slide}'\"")


@app.command()
def predict(
    ctx: typer.Context,
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Slide files or folders.")] = None,
    out: Annotated[Path, typer.Option(help="Predictions CSV, one row per slide.")] = Path("preds.csv"),
    manifest: Annotated[Optional[Path], typer.Option(help="CSV with path[, slide_id, patient_id, mpp].")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="Microns per pixel for slides without a usable scale.")] = None,
    heatmaps: Annotated[Optional[Path], typer.Option(help="Also draw heatmaps into this folder.")] = None,
    tile_scores: Annotated[Optional[Path], typer.Option("--tile-scores", help="CSV of tile attention: slide_id, x, y, size, attention.")] = None,
) -> None:
    """Ingest, tile and embed new slides, then apply the registered heads. Exits 1 if any slide failed."""
    from histcode.heads.apply import HeadNotFound
    from histcode.heads.predict import predict_slides
    from histcode.ingest.sources import ManifestError, read_manifest, sources_from_paths
    from histcode.tracking import telemetry_off

    telemetry_off()
    ws = _ws(ctx)
    cfg = _config(ws)
    try:
        sources = read_manifest(manifest, mpp) if manifest else []
    except ManifestError as exc:
        _fail(str(exc))
    sources += sources_from_paths(list(paths or []), cfg.ingest.extensions, mpp)
    if not sources:
        _fail("give slide paths or --manifest CSV")
    try:
        result = predict_slides(ws, cfg, sources, heatmaps)
    except (HeadNotFound, RuntimeError) as exc:
        _fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    result.predictions.to_csv(out, index=False)
    if tile_scores:
        result.tile_scores.to_csv(tile_scores, index=False)
    failed = result.predictions[result.predictions.status != "ok"]
    console = _console()
    console.print(f"{len(result.predictions) - len(failed)} slides predicted, {len(failed)} failed -> {out}")
    for row in failed.itertuples():
        console.print(f"  [red]{row.slide_id}[/]: {row.reason}")
    if len(failed):
        raise typer.Exit(1)


@app.command()
def ablation(
    ctx: typer.Context,
    method: Annotated[Optional[list[str]], typer.Option("--method", help="random | simclr | moco | adco (repeatable).")] = None,
    aggregator: Annotated[Optional[list[str]], typer.Option("--aggregator", help="mean | attention | max (repeatable).")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", help="tumor | subtype | de (repeatable).")] = None,
) -> None:
    """The paper's ablation grid, encoder x aggregator, as comparable MLflow runs (experiment 'heads')."""
    from histcode.heads.ablation import METHODS, run_ablation
    from histcode.labels.run import LabelGateError
    from histcode.reports import write_json
    from histcode.tracking import telemetry_off
    from histcode.views import heads_table

    telemetry_off()
    ws = _ws(ctx)
    cfg = _config(ws)
    try:
        reports = run_ablation(ws, cfg, tuple(method or METHODS), tuple(aggregator or ("mean", "attention")),
                               tuple(task) if task else None)
    except LabelGateError as exc:
        _fail(str(exc))
    write_json(ws.metrics_dir / "ablation.json", {r.view.method or r.view.view_id: r.summary() for r in reports})
    for r in reports:
        _console().print(heads_table(r.summary()))
    _console().print(f"compare in MLflow: mlflow ui --backend-store-uri {ws.mlflow_uri}  (experiment 'heads')")


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


