"""The label gate: a Great Expectations suite per label frame, run as one checkpoint, with Data Docs.

Frames (written by ``histcode labels ingest`` to ``data/labels/frames``):
  expression   the matrix in long form: no missing cells, numbers only, finite and >= 0 (and below
               ``max_expression``), each (sample, gene) once, not empty;
  samples      every sample maps to a known patient, tumour samples to a registered, tiled tumour slide;
  de_labels    fold changes exist and each labelled sample has its slide;
  class_sizes  every slide task's class has at least ``min_class_size`` slides;
  genes        at least one panel gene is kept for DE classification (exclusions are listed, never silent);
  folds        the planned cross-validation puts every patient in exactly one fold;
  survival     survival labels per patient: times present and >= 0, events 0 or 1, one row per patient;
  survival_events  at least ``min_survival_events`` events among them: below, the survival task alone is refused
               (``GateResult.refused``, with the reason) and the gate still passes for the other tasks.
Every frame carries ``row_key``, a readable name of the row, so a failure names its offending rows.
The Great Expectations project lives in ``data/labels/gx`` and its Data Docs in
``data/labels/gx/uncommitted/data_docs/local_site/index.html``, made to read offline (``datadocs.make_offline``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from histcode.config import LabelsConfig
from histcode.labels.datadocs import make_offline

log = logging.getLogger(__name__)

FRAMES = ("expression", "samples", "de_labels", "class_sizes", "genes", "folds", "survival", "survival_events")
REFUSING = {"survival_events": "survival"}  # frames whose failure refuses one task instead of failing the gate
MAX_ROWS_SHOWN = 5


@dataclass
class GateFailure:
    frame: str
    expectation: str
    column: str | None
    count: int | None  # offending rows; None for a table-level expectation
    rows: list[str]
    description: str = ""

    @property
    def message(self) -> str:
        target = f"{self.expectation}({self.column})" if self.column else self.expectation
        shown = ", ".join(self.rows[:MAX_ROWS_SHOWN]) + (" ..." if len(self.rows) > MAX_ROWS_SHOWN else "")
        if self.count is None:
            return f"{self.frame}: {self.description or 'failed'}" + (f" ({shown})" if shown else "") + f" [{target}]"
        what = f"{self.description}: " if self.description else ""
        plural = "s" if self.count != 1 else ""
        return f"{self.frame}: {what}{self.count} row{plural}" + (f" ({shown})" if shown else "") + f" [{target}]"


@dataclass
class GateResult:
    passed: bool
    failures: list[GateFailure] = field(default_factory=list)
    excluded_genes: dict[str, str] = field(default_factory=dict)
    docs: Path | None = None
    refused: dict[str, str] = field(default_factory=dict)  # task -> why the gate refused it (the others may train)

    def summary(self) -> str:
        refused = "".join(f"\n  {task} refused: {why}" for task, why in self.refused.items())
        if self.passed:
            return "label gate passed" + refused
        return "label gate failed:\n  " + "\n  ".join(f.message for f in self.failures) + refused


def _suites(cfg: LabelsConfig) -> dict[str, list]:
    import great_expectations as gx

    E = gx.expectations

    def says(text: str) -> dict:
        return {"description": text}

    return {
        "expression": [
            E.ExpectTableRowCountToBeBetween(min_value=1, meta=says("the expression table is empty")),
            E.ExpectColumnValuesToNotBeNull(column="sample_id", meta=says("rows without a sample id")),
            E.ExpectColumnValuesToNotBeNull(column="gene", meta=says("rows without a gene id")),
            E.ExpectColumnValuesToNotBeInSet(column="value_type", value_set=["missing"],
                                             meta=says("missing values (empty, NA or NaN cells)")),
            E.ExpectColumnValuesToNotBeInSet(column="value_type", value_set=["text"],
                                             meta=says("cells that are not numbers (wrong type)")),
            E.ExpectColumnValuesToBeBetween(column="value", min_value=0, max_value=cfg.max_expression,
                                            meta=says(f"values that are negative, infinite or above {cfg.max_expression:g}")),
            E.ExpectCompoundColumnsToBeUnique(column_list=["sample_id", "gene"],
                                              meta=says("duplicate (sample, gene) rows")),
        ],
        "samples": [
            E.ExpectTableRowCountToBeBetween(min_value=1, meta=says("no samples")),
            E.ExpectColumnValuesToBeNull(column="problem",
                                         meta=says("samples that map to no registered, tiled slide or patient")),
        ],
        "de_labels": [
            E.ExpectTableRowCountToBeBetween(min_value=1, meta=says("no DE labels (no usable tumour/normal pairs)")),
            E.ExpectColumnValuesToNotBeNull(column="slide_id", meta=says("labels without a slide")),
            E.ExpectCompoundColumnsToBeUnique(column_list=["slide_id", "gene"],
                                              meta=says("slides labelled twice for one gene (by two samples)")),
        ],
        "class_sizes": [
            E.ExpectColumnValuesToBeBetween(column="n", min_value=cfg.min_class_size,
                                            meta=says(f"slide classes with fewer than {cfg.min_class_size} slides")),
        ],
        "genes": [
            E.ExpectColumnValuesToBeInSet(column="included", value_set=[True], mostly=0.0,
                                          meta=says("genes excluded from DE classification (reported, not failing)")),
            E.ExpectColumnSumToBeBetween(column="included", min_value=1,
                                         meta=says("no panel gene has DE classes large enough to learn")),
        ],
        "folds": [
            E.ExpectTableRowCountToBeBetween(min_value=1, meta=says("no patients to split into folds")),
            E.ExpectColumnValuesToBeBetween(column="n_folds", min_value=1, max_value=1,
                                            meta=says("patients in more than one cross-validation fold")),
            E.ExpectColumnValuesToBeBetween(column="fold", min_value=0, max_value=cfg.folds - 1,
                                            meta=says(f"patients without a fold (fewer patients than {cfg.folds} folds)")),
        ],
        "survival": [
            E.ExpectColumnValuesToNotBeNull(column="time", meta=says("survival labels without a time")),
            E.ExpectColumnValuesToBeBetween(column="time", min_value=0,
                                            meta=says("survival times that are negative")),
            E.ExpectColumnValuesToBeInSet(column="event", value_set=[0, 1],
                                          meta=says("survival events other than 0 (censored) or 1 (event)")),
            E.ExpectColumnValuesToBeUnique(column="patient_id", meta=says("patients with two survival labels")),
        ],
        "survival_events": [
            E.ExpectColumnValuesToBeBetween(column="n_events", min_value=cfg.min_survival_events,
                                            meta=says(f"fewer than {cfg.min_survival_events} events among the "
                                                      "patients with survival labels")),
        ],
    }


def _refusal(frames_dir: Path, cfg: LabelsConfig) -> str:
    """Why the survival task is refused, from the survival_events frame."""
    events = pd.read_parquet(frames_dir / "survival_events.parquet").iloc[0]
    if int(events.n_patients) == 0:
        return ("no survival labels: give `histcode labels ingest` a clinical table with survival (--clinical FILE, "
                "or labels.clinical)")
    return (f"{int(events.n_events)} events among the {int(events.n_patients)} labelled patients with survival labels, "
            f"fewer than labels.min_survival_events ({cfg.min_survival_events})")


def _context(project: Path):
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    project.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=str(project))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def run_gate(frames_dir: Path, project: Path, cfg: LabelsConfig) -> GateResult:
    """Validate the frames in ``frames_dir`` with a checkpoint; build the Data Docs; say what failed."""
    import great_expectations as gx

    missing = [f for f in FRAMES if not (frames_dir / f"{f}.parquet").is_file()]
    if missing:
        raise FileNotFoundError(f"label frames {missing} missing in {frames_dir}: run `histcode labels ingest` first")
    context = _context(project)
    source = context.data_sources.add_or_update_pandas_filesystem(name="histcode_labels", base_directory=str(frames_dir))
    definitions = []
    for frame, expectations in _suites(cfg).items():  # (re)defined on every run: the code is the source of truth
        asset = source.get_asset(frame) if frame in [a.name for a in source.assets] else source.add_parquet_asset(name=frame)
        batch = next((b for b in asset.batch_definitions if b.name == frame), None) or \
            asset.add_batch_definition_path(name=frame, path=f"{frame}.parquet")
        suite = context.suites.add_or_update(gx.ExpectationSuite(name=frame, expectations=expectations))
        definitions.append(context.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=frame, data=batch, suite=suite)))
    checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
        name="label_gate", validation_definitions=definitions,
        actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row_key"]},
    ))
    outcome = checkpoint.run()
    result = GateResult(passed=bool(outcome.success))
    for validation in outcome.run_results.values():
        frame = validation.suite_name
        for r in validation.results:
            if r.success:
                continue
            kwargs = r.expectation_config.kwargs
            column = kwargs.get("column") or (",".join(kwargs["column_list"]) if "column_list" in kwargs else None)
            res = r.result or {}
            rows = [str(item.get("row_key")) for item in res.get("unexpected_index_list") or [] if isinstance(item, dict)]
            count = res.get("unexpected_count")
            count = int(count) if count is not None else None
            if count is None and "observed_value" in res:
                rows = [f"observed {res['observed_value']}"]
            if r.exception_info and r.exception_info.get("raised_exception"):
                rows = rows or [str(r.exception_info.get("exception_message"))[:200]]
            description = (r.expectation_config.meta or {}).get("description", "")
            result.failures.append(GateFailure(frame, r.expectation_config.type, column, count, rows, description))
    refusals = [f for f in result.failures if f.frame in REFUSING]
    if refusals:  # one task refused; the gate's verdict is that of the other frames
        result.failures = [f for f in result.failures if f.frame not in REFUSING]
        result.passed = not result.failures
        result.refused = {REFUSING[f.frame]: _refusal(frames_dir, cfg) for f in refusals}
    genes = pd.read_parquet(frames_dir / "genes.parquet")
    result.excluded_genes = dict(zip(genes.loc[~genes.included, "gene"], genes.loc[~genes.included, "reason"]))
    index = project / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    if index.is_file():
        make_offline(index.parent)  # local copies of the pages' CDN scripts and styles: the docs read offline
    result.docs = index if index.is_file() else None
    log.info("%s", result.summary())
    return result
