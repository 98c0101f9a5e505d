"""`histcode labels ingest` and `histcode labels gate`: read the matrix, label, plan folds, gate.

Ingest writes the gate's input frames (``data/labels/frames/*.parquet``, replaced atomically) and the label
tables of the catalog (expression, expression_samples, de_labels, slide_labels, gene_gate, cv_folds,
survival_labels) as the current label set, with its gate status pending. The gate validates the frames and
records pass or fail, with the failed expectations and rows, on the label set; heads train only from a label
set whose gate passed. The gate may also refuse one task (survival, with too few events) while the others
train: the refusal and its reason are kept on the label set (``refused_tasks``).

The slides labelled are the training cohorts' slides tiled under the current tiling spec and those of feature
views imported from another tool (TRIDENT, CLAM), which HistCode never tiled itself (``label_slides``). A tiled
tumour slide that no expression sample labels is named, with why, in the label set (``unlabelled``): it keeps its
tumour and subtype labels and gets no DE labels. A fault of the machine while the label set is written (a full
disk) leaves the current label set as it was and is told as such (``MachineFault``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from histcode.config import HistcodeConfig, LabelsConfig, stable_hash
from histcode.errors import HistcodeError, machine_faults_told
from histcode.labels.de import class_counts, de_labels, gene_inclusion, plan_folds, slide_labels, slide_sites
from histcode.labels.barcodes import TUMOUR
from histcode.labels.expression import (ExpressionFileError, map_samples, read_matrix, read_sample_sheet,
                                       sample_slides, slide_kind)
from histcode.labels.gdc import GdcDownload, label_unit, read_gdc_expression
from histcode.labels.genes import ControlGenes, gene_table_path, resolve_control_genes
from histcode.labels.survival import COLUMNS as SURVIVAL_COLUMNS
from histcode.labels.survival import empty_survival, has_survival_columns, read_survival
from histcode.runtime import failpoint
from histcode.store.catalog import Catalog
from histcode.store.records import utcnow
from histcode.tiling.spec import spec_id_of
from histcode.workspace import Workspace
from histcode.wsi.files import file_sha256

log = logging.getLogger(__name__)

PENDING, PASSED, FAILED = "pending", "passed", "failed"


class LabelGateError(HistcodeError, RuntimeError):
    """Labels are missing or did not pass the gate; the message says what to fix."""


@dataclass
class LabelSet:
    label_version: str
    frames_dir: Path
    n_samples: int
    n_genes: int
    n_patients: int
    de_counts: dict[str, int] = field(default_factory=dict)
    references: dict[str, int] = field(default_factory=dict)
    excluded_genes: dict[str, str] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    cohorts: list[str] = field(default_factory=list)  # the training cohorts whose slides were labelled
    dropped: dict[str, str] = field(default_factory=dict)  # labels.unmatched = drop: samples left out, and why
    folds_by: str | None = None  # what the folds group by, as labels.folds_by resolved: patient | site
    folds_reason: str | None = None  # why
    control_genes: tuple[str, ...] = ()  # as resolved (labels.control_genes, else the gene table)
    control_genes_source: str | None = None  # labels.control_genes, the gene table read, or none
    reused: bool = False  # the current label set already had exactly these inputs: nothing was written
    survival_source: str | None = None  # the clinical table survival labels were read from (None: none)
    survival_endpoint: str | None = None  # overall_survival, or the time/event columns read
    n_survival: int = 0  # labelled patients with a survival label ...
    n_events: int = 0  # ... and their events
    no_follow_up: int = 0  # patients of the clinical table left out: no vital status or time at all
    unlabelled: dict[str, str] = field(default_factory=dict)  # tiled tumour slides no sample labels, and why


def frames_dir(ws: Workspace) -> Path:
    return ws.data_dir / "labels" / "frames"


def gx_project(ws: Workspace) -> Path:
    return ws.data_dir / "labels"


def _sha256(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    return file_sha256(path)


def _keyed(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """Add ``row_key``: the readable name of each row, used by the gate to name offending rows."""
    out = frame.copy()
    if out.empty:
        out["row_key"] = pd.Series(dtype=str)
        return out
    out["row_key"] = out[list(columns)].astype(str).agg(" / ".join, axis=1) if columns else out.index.astype(str)
    return out


def build_frames(long: pd.DataFrame, samples: pd.DataFrame, de: pd.DataFrame, genes: pd.DataFrame,
                 sizes: pd.DataFrame, folds: pd.DataFrame, survival: pd.DataFrame | None = None
                 ) -> dict[str, pd.DataFrame]:
    per_patient = folds.groupby("patient_id").fold.agg(n_folds="nunique", fold="min").reset_index() if len(folds) else \
        pd.DataFrame({"patient_id": pd.Series(dtype=str), "n_folds": pd.Series(dtype=int), "fold": pd.Series(dtype=int)})
    survival = empty_survival() if survival is None else survival
    events = pd.DataFrame({"n_events": [int(survival.event.sum()) if len(survival) else 0],
                           "n_patients": [len(survival)], "endpoint": [survival.source.iloc[0] if len(survival) else ""]})
    return {
        "survival": _keyed(survival, "patient_id"),
        "survival_events": _keyed(events, "endpoint"),
        "expression": _keyed(long, "sample_id", "gene"),
        "samples": _keyed(samples, "sample_id"),
        "de_labels": _keyed(de, "slide_id", "sample_id", "gene"),
        "class_sizes": _keyed(sizes, "task", "class"),
        "genes": _keyed(genes, "gene"),
        "folds": _keyed(per_patient, "patient_id"),
    }


FRAMES_VERSION = "label_version.txt"  # which label set the frames are of: the gate refuses frames of another


def write_frames(frames: dict[str, pd.DataFrame], target: Path, label_version: str) -> None:
    """All frames or none: written to a sibling folder with the label set they are of, then swapped in."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, frame in frames.items():
        frame.to_parquet(tmp / f"{name}.parquet", index=False)
    (tmp / FRAMES_VERSION).write_text(label_version)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def frames_version(target: Path) -> str | None:
    """The label set the frames in ``target`` are of (None: no frames, or frames of an earlier release)."""
    marker = target / FRAMES_VERSION
    return marker.read_text().strip() if marker.is_file() else None


def ingest_labels(ws: Workspace, cfg: HistcodeConfig, expression: Path | None = None,
                  sample_sheet: Path | None = None, force: bool = False, gdc: GdcDownload | None = None,
                  clinical: Path | None = None) -> LabelSet:
    """Label the training cohorts' tiled slides from the expression matrix (or the GDC download ``gdc``, read
    into the same long table and sample sheet, with its clinical subtypes) and make that the current label set
    (gate pending). Unless ``force``, a current label set of exactly these inputs (file contents, sample sheet,
    labels config, slides) whose frames are on disk is kept as it is, gate status included, and returned
    (``reused``): every door (the demo, the flow, `dvc repro`) then does no work on unchanged labels. A GDC
    download or gene table that cannot be read, and folds that cannot be planned as ``labels.folds_by`` asks,
    raise ExpressionFileError (GeneTableError, FoldPlanError) before anything is written.

    Survival labels come from ``clinical`` (a GDC clinical TSV or a time/event table, ``histcode.labels.survival``),
    else ``labels.clinical``, else the GDC download's clinical TSV, else ``clinical.tsv`` beside the matrix; a
    clinical table without survival columns gives none. They are kept for the labelled patients only."""
    lcfg, path, sheet_path, gdc, inputs, controls = _source(ws, cfg, expression, sample_sheet, gdc)
    clinical_path = clinical_source(ws, lcfg, clinical, None if gdc is not None else path, gdc)
    inputs = {**inputs, "clinical": _sha256(clinical_path)}
    catalog = Catalog.of(ws)
    cohorts = catalog.training_cohorts(cfg.cohorts.train)
    slides = label_slides(catalog, cfg, cohorts)
    version = _label_version(inputs, lcfg, slides)
    if not force and path.is_file():
        current = current_label_set(catalog)
        if current is not None and current["label_version"] == version and frames_version(frames_dir(ws)) == version:
            log.info("label set %s is up to date (gate %s)", version, current["gate_status"])
            return _stored_label_set(catalog, current, frames_dir(ws), cohorts)
    subtypes = None
    if gdc is not None:
        download = read_gdc_expression(gdc)
        long, sheet, subtypes = download.long, download.sheet, download.subtypes
    else:
        long = read_matrix(path)
        sheet = read_sample_sheet(sheet_path) if sheet_path else None
    samples = map_samples(sorted(long.sample_id.unique()), slides, sheet)
    mapped = samples
    dropped: dict[str, str] = {}
    if lcfg.unmatched == "drop":
        bad = samples.problem.notna()
        dropped = dict(zip(samples.sample_id[bad], samples.problem[bad]))
        samples = samples[~bad].reset_index(drop=True)
        long = long[long.sample_id.isin(set(samples.sample_id))].reset_index(drop=True)
        if dropped:
            log.warning("labels.unmatched = drop: %d of %d samples left out of the label set (reasons in the report)",
                        len(dropped), len(dropped) + len(samples))
    labelled_by = sample_slides(samples, slides)
    unlabelled = unlabelled_tumour_slides(slides, mapped, labelled_by)
    for slide_id, why in unlabelled.items():
        log.warning("%s: %s", slide_id, why)
    de = de_labels(long, samples, lcfg, labelled_by)
    genes = gene_inclusion(de, lcfg, present=set(long.gene))
    labels = slide_labels(slides, subtypes)
    survival, survival_read = _survival_labels(clinical_path, lcfg, labels)
    folds, choice = plan_folds(labels, lcfg.folds, lcfg.seed, lcfg.folds_by, slide_sites(slides))
    frames = build_frames(long, samples, de, genes, class_counts(labels), folds, survival)
    before = current_label_set(catalog)
    with machine_faults_told(f"writing label set {version}",
                             f"the current label set is still {before['label_version'] if before else 'none'} "
                             "(and the gate judges no frames but its own)"):
        write_frames(frames, frames_dir(ws), version)
        failpoint("labels.frames")  # the frames swapped in, the catalog not yet: the gate refuses frames of another set

        with catalog.transaction() as con:
            catalog.replace_table(con, "expression", long[["sample_id", "gene", "value"]])
            catalog.replace_table(con, "expression_samples", samples)
            catalog.replace_table(con, "de_labels", de)
            catalog.replace_table(con, "slide_labels", labels)
            catalog.replace_table(con, "gene_gate", genes)
            catalog.replace_table(con, "cv_folds", folds)
            catalog.replace_table(con, "survival_labels", survival[SURVIVAL_COLUMNS])
            con.execute("UPDATE label_sets SET is_current = false")
            con.execute("DELETE FROM label_sets WHERE label_version = ?", [version])
            con.execute(
                "INSERT INTO label_sets (label_version, source, source_sha256, sample_sheet, unit, params, n_samples, "
                "n_genes, n_patients, created_at, is_current, gate_status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, true, ?)",
                [version, catalog.stored_path(path), _sha256(path), catalog.stored_path(sheet_path), lcfg.unit,
                 json.dumps({**lcfg.model_dump(mode="json"), "cohorts": cohorts, "dropped": dropped,
                             "folds_by_resolved": choice.by, "folds_by_reason": choice.reason,
                             "control_genes_source": controls.source, "unlabelled": unlabelled,
                             "survival": {"source": catalog.stored_path(clinical_path), **survival_read}}),
                 long.sample_id.nunique(),
                 long.gene.nunique(),
                 int(samples.patient_id.nunique()), utcnow(), PENDING],
            )
    result = LabelSet(
        label_version=version, frames_dir=frames_dir(ws), n_samples=int(long.sample_id.nunique()),
        n_genes=int(long.gene.nunique()), n_patients=int(samples.patient_id.dropna().nunique()),
        de_counts={k: int(v) for k, v in de.de_class.value_counts().items()} if len(de) else {},
        references={k: int(v) for k, v in de.drop_duplicates("sample_id").reference.value_counts().items()} if len(de) else {},
        excluded_genes=dict(zip(genes.loc[~genes.included, "gene"], genes.loc[~genes.included, "reason"])),
        problems=dict(zip(samples.loc[samples.problem.notna(), "sample_id"], samples.loc[samples.problem.notna(), "problem"])),
        cohorts=cohorts, dropped=dropped, folds_by=choice.by, folds_reason=choice.reason,
        control_genes=controls.genes, control_genes_source=controls.source,
        survival_source=str(clinical_path) if clinical_path else None, **_survival_counts(survival, survival_read),
        unlabelled=unlabelled,
    )
    log.info("label set %s (cohorts %s): %d samples, %d genes, %d patients; DE classes %s; %d genes excluded", version,
             ", ".join(cohorts), result.n_samples, result.n_genes, result.n_patients, result.de_counts,
             len(result.excluded_genes))
    return result


def _stored_label_set(catalog: Catalog, current: dict, frames: Path, cohorts: list[str]) -> LabelSet:
    """The current label set as ingest described it, from the catalog's label tables."""
    de = pd.DataFrame(catalog.query("SELECT sample_id, de_class, reference FROM de_labels"))
    genes = catalog.query("SELECT gene, reason FROM gene_gate WHERE NOT included ORDER BY gene")
    problems = catalog.query("SELECT sample_id, problem FROM expression_samples WHERE problem IS NOT NULL")
    params = json.loads(current.get("params") or "{}")
    return LabelSet(
        label_version=current["label_version"], frames_dir=frames, n_samples=int(current["n_samples"]),
        n_genes=int(current["n_genes"]), n_patients=int(current["n_patients"]),
        de_counts={k: int(v) for k, v in de.de_class.value_counts().items()} if len(de) else {},
        references={k: int(v) for k, v in de.drop_duplicates("sample_id").reference.value_counts().items()} if len(de) else {},
        excluded_genes={r["gene"]: r["reason"] for r in genes},
        problems={r["sample_id"]: r["problem"] for r in problems}, cohorts=cohorts, reused=True,
        dropped=params.get("dropped") or {}, folds_by=params.get("folds_by_resolved"),
        folds_reason=params.get("folds_by_reason"), control_genes=tuple(params.get("control_genes") or ()),
        control_genes_source=params.get("control_genes_source"),
        survival_source=catalog.real_path((params.get("survival") or {}).get("source")),
        unlabelled=params.get("unlabelled") or {},
        **_survival_counts(pd.DataFrame(catalog.query("SELECT event FROM survival_labels"), columns=["event"]),
                           params.get("survival") or {}),
    )


def label_slides(catalog: Catalog, cfg: HistcodeConfig, cohorts: list[str]) -> list[dict]:
    """The slides of ``cohorts`` labels are made for, by slide id: those tiled under the current tiling spec, and
    those of feature views imported from another tool (method ``imported:<tool>``, ``histcode.exchange``),
    whose tiles are the other tool's grid: a workspace that only imported TRIDENT or CLAM features is labelled."""
    specs = [spec_id_of(cfg.tiling)] + [r["spec_id"] for r in catalog.query(
        "SELECT DISTINCT spec_id FROM feature_views WHERE method LIKE 'imported:%' ORDER BY spec_id")]
    found: dict[str, dict] = {}
    for spec in specs:
        for slide in catalog.tiled_slides(spec, cohorts):
            found.setdefault(slide["slide_id"], slide)
    return [found[k] for k in sorted(found)]


def unlabelled_tumour_slides(slides: list[dict], samples: pd.DataFrame, labelled_by: dict[str, list[str]]) -> dict[str, str]:
    """Tiled tumour slides that no usable expression sample labels (``labelled_by``: sample -> slides), and why:
    the matrix has no column of their patient's tumour sample, or the ones it has cannot be used (``samples``:
    ``map_samples``' frame, problems included)."""
    labelled = {sid for sids in labelled_by.values() for sid in sids}
    out = {}
    for slide in slides:
        if slide["slide_id"] in labelled or slide_kind(slide) != TUMOUR:
            continue
        own = samples[(samples.patient_id == slide["patient_id"]) & (samples.kind == TUMOUR)]
        problems = [f"{r.sample_id}: {r.problem}" for r in own.itertuples() if isinstance(r.problem, str)]
        out[slide["slide_id"]] = (
            f"tiled tumour slide of patient {slide['patient_id']} with no expression column: it gets no DE labels "
            + (f"(its patient's tumour samples cannot label it: {'; '.join(problems)[:300]})" if problems else
               f"(the matrix has no tumour sample of patient {slide['patient_id']})"))
    return out


def _survival_counts(survival: pd.DataFrame, read: dict) -> dict:
    return {"survival_endpoint": read.get("endpoint"), "n_survival": len(survival),
            "n_events": int(survival.event.sum()) if len(survival) else 0,
            "no_follow_up": int(read.get("no_follow_up", 0))}


def clinical_source(ws: Workspace, lcfg: LabelsConfig, clinical: Path | None, matrix: Path | None,
                    gdc: GdcDownload | None) -> Path | None:
    """The clinical table survival labels are read from: ``clinical``, else ``labels.clinical``, else the GDC
    download's clinical TSV, else ``clinical.tsv`` beside the expression matrix when there is one; None: none."""
    if clinical is not None:
        return clinical
    if lcfg.clinical:
        return ws.path(lcfg.clinical)
    if gdc is not None:
        return gdc.clinical
    beside = matrix.parent / "clinical.tsv" if matrix is not None else None
    return beside if beside is not None and beside.is_file() else None


def _survival_labels(path: Path | None, lcfg: LabelsConfig, labels: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """(the survival labels of the labelled patients, what was read: endpoint, counts), from the clinical table
    ``path``; none without one, or from a clinical table that has no survival columns (logged)."""
    if path is None:
        return empty_survival(), {}
    if not has_survival_columns(path, lcfg.survival_time_column, lcfg.survival_event_column):
        log.info("clinical table %s has no survival columns: no survival labels", path)
        return empty_survival(), {}
    read = read_survival(path, lcfg.survival_time_column, lcfg.survival_event_column)
    patients = set(labels.patient_id.dropna())
    kept = read.frame[read.frame.patient_id.isin(patients)].reset_index(drop=True)
    if len(kept) < len(read.frame):
        log.info("survival labels: %d of %d patients of %s have no labelled slide here and are left out",
                 len(read.frame) - len(kept), len(read.frame), path)
    return kept, {"endpoint": read.endpoint, "no_follow_up": len(read.no_follow_up),
                  "without_slides": len(read.frame) - len(kept)}


def configured_gdc(ws: Workspace, cfg: HistcodeConfig) -> GdcDownload | None:
    """The GDC download ``labels.gdc`` names, if any (paths relative to the workspace)."""
    source = cfg.labels.gdc
    if source is None:
        return None
    return GdcDownload(ws.path(source.sheet), ws.path(source.dir), ws.path(source.clinical) if source.clinical else None,
                       cfg.labels.gdc_unit, cfg.labels.gdc_genes, source.subtype_column)


def _source(ws: Workspace, cfg: HistcodeConfig, expression: Path | None, sample_sheet: Path | None,
            gdc: GdcDownload | None):
    """(labels config as ingested, source path, sample sheet path, GDC download, input digests, control genes): a
    matrix given here, else a GDC download given here, else ``labels.gdc``, else ``labels.expression``. The config
    as ingested holds the control genes resolved (``_with_controls``)."""
    lcfg = cfg.labels
    if gdc is None and expression is None:
        if sample_sheet is not None and lcfg.gdc is not None:
            raise ExpressionFileError(f"a sample sheet ({sample_sheet}) goes with a matrix, and labels.gdc names a GDC "
                                      "download: give the matrix too, or leave the sheet out")
        gdc = None if sample_sheet is not None else configured_gdc(ws, cfg)
    if gdc is not None:
        lcfg = lcfg.model_copy(update={"unit": label_unit(gdc.unit), "gdc_unit": gdc.unit, "gdc_genes": gdc.genes,
                                       "gdc": None})  # the download is in the digest, wherever it was named
        lcfg, controls = _with_controls(ws, lcfg, None)  # no matrix file: only labels.gene_table is looked for
        return lcfg, gdc.sheet, None, gdc, {"gdc": gdc.digest(), "gene_table": controls.digest()}, controls
    lcfg = lcfg.model_copy(update={"gdc": None})  # a matrix: labels.gdc, if set, was not read
    path = expression or ws.path(lcfg.expression)
    sheet_path = sample_sheet or (ws.path(lcfg.sample_sheet) if lcfg.sample_sheet else None)
    lcfg, controls = _with_controls(ws, lcfg, path)
    inputs = {"file": _sha256(path), "sheet": _sha256(sheet_path), "gene_table": controls.digest()}
    return lcfg, path, sheet_path, None, inputs, controls


def _with_controls(ws: Workspace, lcfg: LabelsConfig, matrix: Path | None) -> tuple[LabelsConfig, ControlGenes]:
    """(the labels config with its control genes resolved, how they were): ``labels.control_genes`` if set, else
    the gene table's (``labels.gene_table``, or ``genes.csv`` beside ``matrix``), else none."""
    table = None
    if lcfg.control_genes is None:
        table = gene_table_path(ws.path(lcfg.gene_table) if lcfg.gene_table else None, matrix)
    controls = resolve_control_genes(lcfg, table)
    return lcfg.model_copy(update={"control_genes": controls.genes}), controls


def _label_version(inputs: dict, lcfg, slides: list[dict]) -> str:
    """The label set's id: its inputs' digests (``file`` and ``sheet``, or ``gdc``; ``gene_table``), the labels config
    (``folds_by`` and the resolved ``control_genes`` included), the slides."""
    return "ls-" + stable_hash({**inputs, "cfg": lcfg.model_dump(mode="json"),
                                "slides": sorted(s["slide_id"] + s["content_hash"] for s in slides)}, 12)


def passed_label_set(ws: Workspace, cfg: HistcodeConfig, expression: Path | None = None,
                     sample_sheet: Path | None = None) -> dict | None:
    """The current label set if ingesting ``expression`` now would give exactly it (same file contents, sample
    sheet, labels config and tiled slides) and it passed the gate; None means ingest and gate have work to do."""
    if not ws.catalog_path.is_file():
        return None
    catalog = Catalog.of(ws)
    current = current_label_set(catalog)
    if current is None or current["gate_status"] != PASSED:
        return None
    try:
        lcfg, path, sheet_path, gdc, inputs, _ = _source(ws, cfg, expression, sample_sheet, None)
    except ExpressionFileError:  # a configured GDC download that is not (or no longer) all there, a bad gene table
        return None
    inputs = {**inputs, "clinical": _sha256(clinical_source(ws, lcfg, None, None if gdc is not None else path, gdc))}
    if not path.is_file() or (sheet_path is not None and not sheet_path.is_file()):
        return None
    version = _label_version(inputs, lcfg, label_slides(catalog, cfg, catalog.training_cohorts(cfg.cohorts.train)))
    return current if current["label_version"] == version else None


def gate_labels(ws: Workspace, cfg: HistcodeConfig, force: bool = False):
    """Run the gate on the current label set's frames and record the outcome on it. A label set the gate has
    already judged with these gate settings (its frames are rewritten, and its status reset to pending, only by
    an ingest that changed them) keeps its verdict unless ``force``."""
    from histcode.labels.datadocs import make_offline
    from histcode.labels.gate import GateFailure, GateResult, run_gate

    catalog = Catalog.of(ws)
    current = current_label_set(catalog)
    if current is None:
        raise LabelGateError("no label set yet: run `histcode labels ingest` first")
    settings = _gate_settings(cfg)
    if not force and current["gate_status"] in (PASSED, FAILED) and current.get("gate_settings") == settings:
        log.info("label set %s: gate already %s with these settings", current["label_version"], current["gate_status"])
        failures = [GateFailure(f["frame"], f["expectation"], f["column"], f["count"], f["rows"], f.get("description", ""))
                    for f in json.loads(current["gate_failures"] or "[]")]
        excluded = catalog.query("SELECT gene, reason FROM gene_gate WHERE NOT included ORDER BY gene")
        docs = Path(catalog.real_path(current["data_docs"])) if current["data_docs"] else None
        if docs is not None and docs.is_file():
            make_offline(docs.parent)  # a site built before its pages were made offline (nothing to do otherwise)
        return GateResult(current["gate_status"] == PASSED, failures, {r["gene"]: r["reason"] for r in excluded}, docs,
                          json.loads(current.get("refused_tasks") or "{}"))
    found = frames_version(frames_dir(ws))
    if found != current["label_version"]:  # e.g. an ingest whose catalog commit failed after its frames were written
        raise LabelGateError(f"the label frames in {frames_dir(ws)} are of label set {found or 'an earlier release'}, not "
                             f"of the current {current['label_version']}: run `histcode labels ingest` again")
    result = run_gate(frames_dir(ws), gx_project(ws), cfg.labels)
    failures = [{"frame": f.frame, "expectation": f.expectation, "column": f.column, "count": f.count,
                 "rows": f.rows[:50], "description": f.description, "message": f.message} for f in result.failures]
    with catalog.transaction() as con:
        con.execute(
            "UPDATE label_sets SET gate_status = ?, gate_at = ?, gate_failures = ?, data_docs = ?, gate_settings = ?, "
            "refused_tasks = ? WHERE label_version = ?",
            [PASSED if result.passed else FAILED, utcnow(), json.dumps(failures), catalog.stored_path(result.docs),
             settings, json.dumps(result.refused), current["label_version"]],
        )
    return result


def _gate_settings(cfg: HistcodeConfig) -> str:
    """The labels settings the gate's expectations read (a change re-runs the gate on the same frames)."""
    lcfg = cfg.labels
    return stable_hash({"min_class_size": lcfg.min_class_size, "max_expression": lcfg.max_expression,
                        "folds": lcfg.folds, "min_survival_events": lcfg.min_survival_events}, 12)


def current_label_set(catalog: Catalog) -> dict | None:
    rows = catalog.query("SELECT * FROM label_sets WHERE is_current") if catalog.path.exists() else []
    return rows[0] if rows else None


def gate_refusal(current: dict | None) -> LabelGateError | None:
    """Why nothing may train on the label set ``current`` (a ``label_sets`` row, None before any ingest), or
    None when its gate passed."""
    if current is None:
        return LabelGateError("no labels: run `histcode labels ingest` and `histcode labels gate` first")
    if current["gate_status"] == PENDING:
        return LabelGateError(f"label set {current['label_version']} has not been through the gate: run "
                              "`histcode labels gate`")
    if current["gate_status"] != PASSED:
        failures = json.loads(current["gate_failures"] or "[]")
        return LabelGateError(f"label set {current['label_version']} failed the gate; nothing trains until it passes:\n  "
                              + "\n  ".join(f["message"] for f in failures))
    return None


def require_passed_gate(catalog: Catalog) -> dict:
    """The current label set if its gate passed; otherwise LabelGateError naming what failed. Heads call this
    before training anything."""
    current = current_label_set(catalog)
    refusal = gate_refusal(current)
    if refusal is not None:
        raise refusal
    return current
