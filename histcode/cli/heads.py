"""`histcode` commands for heads, heatmaps, predictions and the ablation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histcode.cli.common import config_of, fail, named_paths, slide_sources, terminal, workspace_of


def heads(
    ctx: typer.Context,
    task: Annotated[Optional[list[str]], typer.Option("--task", help="tumor | subtype | de | survival (repeatable; default heads.tasks, where a survival task the label gate refused is skipped with the reason).")] = None,
    aggregator: Annotated[Optional[list[str]], typer.Option("--aggregator", help="attention | mean | max | guided (repeatable).")] = None,
    view: Annotated[Optional[str], typer.Option(help="Feature view id (default: heads.view, else features.encoder's view).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/heads.json).")] = None,
    plots: Annotated[Optional[Path], typer.Option(help="Folder for ROC and per-gene CSVs (default: metrics/plots).")] = None,
    force: Annotated[bool, typer.Option(help="Train again even heads whose inputs are unchanged since their last run.")] = False,
    promote: Annotated[bool, typer.Option(help="Move the production aliases to this run's versions even where they score worse.")] = False,
) -> None:
    """Cross-validate and register the heads (only after the label gate passed). @best and the aggregator
    aliases move only to versions that score better on the same label set (or with --promote)."""
    from histcode.features.registry import ViewError
    from histcode.apps.train_heads import train_heads
    from histcode.store.catalog import CatalogError
    from histcode.labels.run import LabelGateError
    from histcode.reports import write_heads_report
    from histcode.tracking import telemetry_off
    from histcode.views import heads_table

    telemetry_off()
    ws = workspace_of(ctx)
    cfg = config_of(ws)
    if promote:
        cfg = cfg.model_copy(update={"heads": cfg.heads.model_copy(update={"promote": True})})
    try:
        result = train_heads(ws, cfg, tuple(task) if task else None, tuple(aggregator) if aggregator else None, view,
                             force=force)
    except (LabelGateError, ViewError, ValueError, CatalogError) as exc:
        fail(str(exc))
    summary = write_heads_report(result, report or ws.metrics_dir / "heads.json", plots or ws.metrics_dir / "plots")
    console = terminal()
    console.print(f"view {result.view.view_id}: encoder {result.view.model_name}/{result.view.model_version} "
                  f"({result.view.method})")
    console.print(heads_table(summary))
    for key, r in summary["runs"].items():
        if key.startswith("survival/") and "c_index" in r:
            aucs = ", ".join(f"{k.removeprefix('auc_')} {v:.3f}" for k, v in r.items() if k.startswith("auc_"))
            console.print(f"{key}: C-index {r['c_index']:.3f} [{r.get('c_index_ci_low', float('nan')):.2f}, "
                          f"{r.get('c_index_ci_high', float('nan')):.2f}], time-dependent AUC {aucs or '-'}, "
                          f"log-rank p {r.get('logrank_p', float('nan')):.3g} (high {r.get('n_high', 0):.0f} vs low "
                          f"{r.get('n_low', 0):.0f} patients)")
    for task, m in summary.get("patients", {}).items():
        console.print(f"{task}, per patient (out of fold, {m['patients']:.0f} patients): AUC {m['auc']:.3f} "
                      f"[{m['auc_low']:.2f}, {m['auc_high']:.2f}], accuracy {m['accuracy']:.3f}")
    for task, why in summary.get("refused", {}).items():
        console.print(f"[yellow]{task} skipped[/]: {why}")
    for task, aliases in summary["aliases"].items():
        for alias, a in aliases.items():
            console.print(f"{task}@{alias}: version {a['version']} ({'moved: ' if a['moved'] else 'kept: '}{a['reason']})")


def heatmap(
    ctx: typer.Context,
    slide: Annotated[str, typer.Argument(help="Slide id.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for the PNGs (default: outputs/heatmaps).")] = None,
    gene: Annotated[Optional[list[str]], typer.Option("--gene", help="Genes to map (repeatable; default: the first two).")] = None,
    alias: Annotated[str, typer.Option(help="Tumour-head alias whose attention is drawn.")] = "attention",
    force: Annotated[bool, typer.Option(help="Draw again even if these heads already drew this slide here.")] = False,
) -> None:
    """Attention and gene-specific tile scores over the slide; AUC against its ground-truth mask if known."""
    from histcode.apps.heatmaps import render_heatmaps
    from histcode.tracking import telemetry_off

    telemetry_off()
    ws = workspace_of(ctx)
    try:
        result = render_heatmaps(ws, slide, out or ws.outputs_dir / "heatmaps", gene, alias, force=force)
    except LookupError as exc:
        fail(str(exc))
    console = terminal()
    for head, view in result.views.items():
        console.print(f"{head}: view {view}")
    for picture in result.pictures:
        console.print(f"heatmap: {picture}")
    if result.mask_auc is not None:
        console.print(f"attention vs ground-truth tumour mask: AUC {result.mask_auc:.3f}")
    literal = slide.replace("'", "''")
    console.print(f"{len(result.scores)} tile scores stored: histcode sql \"SELECT * FROM tile_scores WHERE slide_id = '{literal}'\"")


def predict(
    ctx: typer.Context,
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Slide files or folders.")] = None,
    out: Annotated[Path, typer.Option(help="Predictions CSV, one row per slide.")] = Path("preds.csv"),
    manifest: Annotated[Optional[Path], typer.Option(help="CSV with path[, slide_id, patient_id, mpp].")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="Microns per pixel for slides without a usable scale.")] = None,
    heatmaps: Annotated[Optional[Path], typer.Option(help="Also draw heatmaps into this folder.")] = None,
    tile_scores: Annotated[Optional[Path], typer.Option("--tile-scores", help="CSV of tile attention: slide_id, x, y, size, attention.")] = None,
    patients: Annotated[Optional[Path], typer.Option("--patients", help="CSV of the predicted slides' patients' pooled predictions (predict.patient_pooling), one row per patient and output.")] = None,
    cohort: Annotated[Optional[str], typer.Option(help="Inference cohort for the new slides (default: cohorts.predict); never trained on.")] = None,
    refresh: Annotated[bool, typer.Option("--refresh", help="Predict again the registered slides whose stored predictions are stale (a newer head version is @best) or missing (inference cohorts); with --slide, those slides.")] = False,
    slide: Annotated[Optional[list[str]], typer.Option("--slide", help="With --refresh: this registered slide (repeatable).")] = None,
    slide_weights: Annotated[Optional[list[str]], typer.Option("--slide-weights", help="NAME=PATH: a slide encoder's weight file, for heads trained on its view (repeatable).")] = None,
) -> None:
    """Ingest, tile and embed new slides into an inference cohort, then apply the registered heads and store the
    predictions in the catalog (table ``predictions``) and the CSV. Exits 1 if any slide failed."""
    from histcode.heads.apply import HeadNotFound
    from histcode.apps.predict import predict_slides, refresh_sources
    from histcode.ssl.encoders import EncoderError
    from histcode.store.catalog import Catalog
    from histcode.tracking import Tracker, telemetry_off

    telemetry_off()
    ws = workspace_of(ctx)
    cfg = config_of(ws)
    if slide and not refresh:
        fail("--slide is for --refresh (new slides are given as paths)")
    if refresh:
        if paths or manifest:
            fail("--refresh predicts registered slides again: give no paths or --manifest with it")
        try:
            sources = refresh_sources(Catalog.of(ws), Tracker(ws), slide)
        except LookupError as exc:
            fail(str(exc))
        if not sources:
            terminal().print("every stored prediction is current: nothing to refresh")
            return
    else:
        sources = slide_sources(paths, manifest, mpp, cfg.ingest.extensions)
    weights = named_paths(slide_weights, "--slide-weights", "chief=/weights/CHIEF_pretraining.pth")
    try:
        result = predict_slides(ws, cfg, sources, heatmaps, cohort=cohort, slide_weights=weights)
    except (HeadNotFound, RuntimeError, EncoderError) as exc:
        fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    result.predictions.to_csv(out, index=False)
    if tile_scores:
        result.tile_scores.to_csv(tile_scores, index=False)
    if patients:
        patients.parent.mkdir(parents=True, exist_ok=True)
        result.patients.to_csv(patients, index=False)
    failed = result.predictions[result.predictions.status != "ok"]
    console = terminal()
    for head, view in result.views.items():
        console.print(f"{head}: view {view}")
    console.print(f"{len(result.predictions) - len(failed)} slides predicted, {len(failed)} failed -> {out} and the "
                  "catalog: histcode sql \"SELECT * FROM current_predictions\"")
    if len(result.patients):
        pooled = result.patients.groupby("patient_id").n_slides.max()
        several = int((pooled > 1).sum())
        console.print(f"{len(pooled)} patients predicted ({several} over several slides, pooling "
                      f"{cfg.predict.patient_pooling}): histcode sql \"SELECT * FROM current_patient_predictions\"")
    outside = result.predictions[result.predictions.in_distribution == False]  # noqa: E712 -- NaN for failed rows
    for row in outside.itertuples():
        console.print(f"  [yellow]{row.slide_id}[/]: {row.reason}")
    for row in failed.itertuples():
        console.print(f"  [red]{row.slide_id}[/]: {row.reason}")
    if len(failed):
        raise typer.Exit(1)


def ablation(
    ctx: typer.Context,
    method: Annotated[Optional[list[str]], typer.Option("--method", help="random | simclr | moco | adco, or a registered encoder's alias such as uni (repeatable).")] = None,
    aggregator: Annotated[Optional[list[str]], typer.Option("--aggregator", help="mean | attention | max | guided (repeatable; default mean, attention, guided).")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", help="tumor | subtype | de (repeatable).")] = None,
) -> None:
    """The paper's ablation grid, encoder x aggregator, as comparable MLflow runs (experiment 'heads')."""
    from histcode.apps.ablation import AGGREGATORS, METHODS, AblationError, run_ablation
    from histcode.labels.run import LabelGateError
    from histcode.store.files import write_json
    from histcode.tracking import telemetry_off
    from histcode.views import heads_table

    telemetry_off()
    ws = workspace_of(ctx)
    cfg = config_of(ws)
    try:
        reports = run_ablation(ws, cfg, tuple(method or METHODS), tuple(aggregator or AGGREGATORS),
                               tuple(task) if task else None)
    except (LabelGateError, AblationError) as exc:
        fail(str(exc))
    write_json(ws.metrics_dir / "ablation.json", {r.view.method or r.view.view_id: r.summary() for r in reports})
    for r in reports:
        terminal().print(heads_table(r.summary()))
    terminal().print(f"compare in MLflow: histcode --workspace {ws.root} mlflow-ui  (experiment 'heads')")


COMMANDS = (
    ("heads", heads),
    ("heatmap", heatmap),
    ("predict", predict),
    ("ablation", ablation),
)
