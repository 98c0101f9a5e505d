"""`histcode labels ...`: expression labels and the Great Expectations gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histcode.cli.common import config_of, fail, terminal, workspace_of


def labels_ingest(
    ctx: typer.Context,
    file: Annotated[Optional[Path], typer.Argument(help="Genes x samples matrix (TSV, CSV, parquet); default labels.expression.")] = None,
    sample_sheet: Annotated[Optional[Path], typer.Option(help="CSV sample_id, patient_id[, slide_id, sample_type].")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/labels.json).")] = None,
    force: Annotated[bool, typer.Option(help="Ingest again even if the current label set has exactly these inputs.")] = False,
    gdc: Annotated[Optional[tuple[Path, Path]], typer.Option(metavar="SAMPLE_SHEET DIR", help="A GDC download instead of a matrix: the cart's sample sheet and the folder gdc-client wrote (STAR gene counts).")] = None,
    gdc_unit: Annotated[Optional[str], typer.Option(help="With --gdc: the STAR counts column (default labels.gdc_unit, tpm_unstranded).")] = None,
    gdc_genes: Annotated[Optional[str], typer.Option(help="With --gdc: name genes by 'symbol' or 'ensembl' id without version (default labels.gdc_genes).")] = None,
    clinical: Annotated[Optional[Path], typer.Option(help="A clinical table: GDC's clinical TSV (overall survival from vital_status, days_to_death, days_to_last_follow_up; with --gdc also each patient's subtype from project_id) or a CSV patient_id,time,event. Default labels.clinical, else clinical.tsv beside the matrix.")] = None,
    subtype_column: Annotated[Optional[str], typer.Option(help="With --gdc --clinical: take the subtype from this column instead of project_id.")] = None,
    time_column: Annotated[Optional[str], typer.Option(help="With --clinical: another survival endpoint's time column (days); needs --event-column.")] = None,
    event_column: Annotated[Optional[str], typer.Option(help="With --clinical: that endpoint's event column (1/0, true/false, Dead/Alive).")] = None,
) -> None:
    """Read an expression matrix (or a GDC download), map samples to slides, compute DE labels and slide labels,
    plan the folds. A current label set of exactly these inputs is kept (gate verdict included) unless --force."""
    from histcode.labels.expression import ExpressionFileError
    from histcode.labels.gdc import GdcDownload
    from histcode.labels.run import ingest_labels
    from histcode.reports import labels_summary
    from histcode.store.files import write_json
    from histcode.store.catalog import CatalogError

    ws = workspace_of(ctx)
    cfg = config_of(ws)
    if (time_column is None) != (event_column is None):
        fail("--time-column and --event-column go together (a survival endpoint's time and event)")
    if time_column is not None:
        cfg = cfg.model_copy(update={"labels": cfg.labels.model_copy(
            update={"survival_time_column": time_column, "survival_event_column": event_column})})
    download = None
    if gdc is not None:
        if file is not None or sample_sheet is not None:
            fail("--gdc reads the expression and samples from the download: give no matrix or --sample-sheet with it")
        download = GdcDownload(gdc[0], gdc[1], clinical, gdc_unit or cfg.labels.gdc_unit,
                               gdc_genes or cfg.labels.gdc_genes, subtype_column)
    elif subtype_column or gdc_unit or gdc_genes:
        fail("--subtype-column, --gdc-unit and --gdc-genes go with --gdc SAMPLE_SHEET DIR")
    try:
        result = ingest_labels(ws, cfg, file, sample_sheet, force=force, gdc=download, clinical=clinical)
    except (ExpressionFileError, CatalogError) as exc:
        fail(str(exc))
    summary = labels_summary(result)
    write_json(report or ws.metrics_dir / "labels.json", summary)
    console = terminal()
    if result.reused:
        console.print(f"label set {result.label_version} is up to date (nothing written; --force ingests again)")
    console.print(f"label set {result.label_version}: {result.n_samples} samples, {result.n_genes} genes, "
                  f"{result.n_patients} patients; DE classes {result.de_counts}; references {result.references}")
    for gene, reason in result.excluded_genes.items():
        console.print(f"  [yellow]excluded[/] {gene}: {reason}")
    for sample, problem in result.problems.items():
        console.print(f"  [red]sample[/] {sample}: {problem}")
    for slide, why in result.unlabelled.items():
        console.print(f"  [yellow]slide[/] {slide}: {why}")
    if result.dropped:
        console.print(f"  [yellow]{len(result.dropped)} samples left out[/] (labels.unmatched = drop; reasons in the "
                      "report), e.g. " + "; ".join(f"{k}: {v}" for k, v in list(result.dropped.items())[:3]))
    if result.survival_source:
        console.print(f"survival ({result.survival_endpoint or 'none'}) from {result.survival_source}: "
                      f"{result.n_survival} labelled patients, {result.n_events} events"
                      + (f"; {result.no_follow_up} patients without follow-up left out" if result.no_follow_up else ""))
    console.print("next: `histcode labels gate`")


def labels_gate(
    ctx: typer.Context,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/label_gate.json).")] = None,
    force: Annotated[bool, typer.Option(help="Validate again even if this label set already has a verdict with these settings.")] = False,
) -> None:
    """Validate the current label set with Great Expectations; exits 1 (and nothing may train) if it fails. A
    label set already judged with the same gate settings keeps its verdict unless --force."""
    from histcode.labels.run import LabelGateError, gate_labels
    from histcode.reports import gate_summary
    from histcode.store.files import write_json

    ws = workspace_of(ctx)
    cfg = config_of(ws)
    try:
        result = gate_labels(ws, cfg, force=force)
    except (LabelGateError, FileNotFoundError) as exc:
        fail(str(exc))
    write_json(report or ws.metrics_dir / "label_gate.json", gate_summary(result))
    console = terminal()
    console.print(("[green]" if result.passed else "[red]") + result.summary() + "[/]", soft_wrap=True)
    for gene, reason in result.excluded_genes.items():
        console.print(f"  excluded from DE classification: {gene}: {reason}")
    if result.docs:
        console.print(f"Data Docs: {result.docs}")
    if not result.passed:
        raise typer.Exit(1)


HELP = "Expression labels: ingest, DE labelling, the gate."

COMMANDS = (
    ("ingest", labels_ingest),
    ("gate", labels_gate),
)
