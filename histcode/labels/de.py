"""Differential-expression labels and slide labels.

Per patient and panel gene: log2 fold change of the tumour sample against the patient's matched normal sample,
or, where the patient has none, against the mean of the cohort's normal samples (recorded as such). With a
pseudo-count pc: log2FC = log2((T + pc) / (N + pc)); counts are first scaled to counts per million. Classes:
up (log2FC >= up threshold), down (<= down threshold), unchanged. A gene whose DE classes are too small for
its head to learn from is excluded from classification with the reason; the rest are labelled. The heads' folds
are planned here too, by patient or by tissue-source site (``labels.folds_by``, ``plan_folds``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from histcode.config import LabelsConfig
from histcode.labels.barcodes import NORMAL, TUMOUR, tissue_source_site
from histcode.labels.expression import ExpressionFileError, slide_kind

log = logging.getLogger(__name__)

UP, DOWN, UNCHANGED = "up", "down", "unchanged"
MATCHED, COHORT = "matched_normal", "cohort_normal_mean"


def numeric_matrix(long: pd.DataFrame, unit: str) -> pd.DataFrame:
    """genes x samples of numbers (cells that are not numbers become NaN; duplicates are averaged)."""
    values = pd.to_numeric(long["value"], errors="coerce")
    matrix = long.assign(value=values).pivot_table(index="gene", columns="sample_id", values="value", aggfunc="mean",
                                                   dropna=False)
    if unit == "counts":
        matrix = matrix / matrix.sum(axis=0) * 1e6
    return matrix


def classify(log2fc: pd.Series, cfg: LabelsConfig) -> pd.Series:
    return pd.Series(np.where(log2fc >= cfg.up_log2fc, UP, np.where(log2fc <= cfg.down_log2fc, DOWN, UNCHANGED)),
                     index=log2fc.index)


def de_labels(long: pd.DataFrame, samples: pd.DataFrame, cfg: LabelsConfig,
              slides_of: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """One row per (slide of a tumour sample, panel gene): patient_id, slide_id, sample_id, gene, log2fc,
    reference, de_class. ``slides_of``: every slide a sample labels (default: its ``slide_id``)."""
    return fold_changes(numeric_matrix(long, cfg.unit), samples, cfg, slides_of=slides_of)


def panel_matrix(catalog, cfg: LabelsConfig) -> pd.DataFrame:
    """The label set's panel genes x samples from the catalog's ``expression`` table, scaled as ``de_labels``
    scales them (counts per million over all of a sample's genes when the unit is counts)."""
    marks = ", ".join("?" for _ in cfg.panel)
    long = pd.DataFrame(catalog.query(f"SELECT sample_id, gene, value FROM expression WHERE gene IN ({marks})",
                                      list(cfg.panel)), columns=["sample_id", "gene", "value"])
    matrix = numeric_matrix(long, "TPM")
    if cfg.unit == "counts":
        totals = {r["sample_id"]: r["total"] for r in catalog.query(
            "SELECT sample_id, SUM(TRY_CAST(value AS DOUBLE)) AS total FROM expression GROUP BY sample_id")}
        matrix = matrix / pd.Series(totals).reindex(matrix.columns) * 1e6
    return matrix


def fold_changes(matrix: pd.DataFrame, samples: pd.DataFrame, cfg: LabelsConfig,
                 cohort_normals: set[str] | None = None, slides_of: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """``de_labels`` from a genes x samples matrix. ``cohort_normals``: the normal samples the cohort-normal
    reference may average (default: every usable normal); the heads pass a training fold's normals so that no
    test-fold sample shapes a training label. A patient's own normal is always its reference."""
    usable = samples[samples.problem.isna()]
    tumours = usable[usable.kind == TUMOUR]
    normals = usable[usable.kind == NORMAL]
    genes = [g for g in cfg.panel if g in matrix.index]
    if not genes or tumours.empty:
        return pd.DataFrame(columns=["patient_id", "slide_id", "sample_id", "gene", "log2fc", "reference", "de_class"])
    pool = normals if cohort_normals is None else normals[normals.sample_id.isin(cohort_normals)]
    cohort_normal = matrix.loc[genes, pool.sample_id].mean(axis=1) if not pool.empty else None
    rows = []
    for t in tumours.itertuples():
        own = normals[normals.patient_id == t.patient_id].sample_id.tolist()
        if own:
            reference, base = MATCHED, matrix.loc[genes, own].mean(axis=1)
        elif cohort_normal is not None:
            reference, base = COHORT, cohort_normal
        else:
            continue  # no normal sample anywhere: no fold change can be computed (the gate reports it)
        with np.errstate(divide="ignore", invalid="ignore"):  # bad values give NaN/inf; the gate reports them
            fc = np.log2((matrix.loc[genes, t.sample_id] + cfg.pseudo_count) / (base + cfg.pseudo_count))
        for slide in (slides_of or {}).get(t.sample_id, [t.slide_id]):
            for gene in genes:
                rows.append({"patient_id": t.patient_id, "slide_id": slide, "sample_id": t.sample_id, "gene": gene,
                             "log2fc": float(fc[gene]), "reference": reference})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["patient_id", "slide_id", "sample_id", "gene", "log2fc", "reference", "de_class"])
    frame["de_class"] = classify(frame.log2fc, cfg)
    return frame


def gene_inclusion(labels: pd.DataFrame, cfg: LabelsConfig, present: set[str]) -> pd.DataFrame:
    """Per panel gene: class sizes, whether it is kept for DE classification, and why not."""
    rows = []
    for gene in cfg.panel:
        sub = labels[labels.gene == gene] if not labels.empty else labels
        sub = sub.drop_duplicates("sample_id")  # a sample's slides share its label: count samples, not slides
        counts = sub.de_class.value_counts() if not sub.empty else pd.Series(dtype=int)
        n = {c: int(counts.get(c, 0)) for c in (UP, DOWN, UNCHANGED)}
        present_classes = {c: k for c, k in n.items() if k > 0}
        reason = None
        if gene not in present:
            reason = "not in the expression matrix"
        elif sub.log2fc.isna().any():
            reason = "fold changes not computable (missing or non-numeric values)"
        elif len(present_classes) < 2:
            only = next(iter(present_classes), "none")
            reason = f"a single class ({only}) across all {len(sub)} tumour samples: nothing to learn"
        else:
            small = {c: k for c, k in present_classes.items() if k < cfg.min_class_size}
            if small:
                reason = "; ".join(f"class {c} has {k} tumour sample{'s' if k != 1 else ''} (< {cfg.min_class_size})"
                                   for c, k in small.items())
        rows.append({"gene": gene, "included": reason is None, "reason": reason, "n_up": n[UP], "n_down": n[DOWN],
                     "n_unchanged": n[UNCHANGED]})
    return pd.DataFrame(rows)


def slide_labels(slides: list[dict], subtypes: dict[str, str] | None = None) -> pd.DataFrame:
    """Tumour diagnosis (from the sample type of the slide barcode or the manifest) and subtype where known: the
    patient's in ``subtypes`` (e.g. a GDC clinical TSV's), else the slide attribute ``subtype``."""
    rows, disagree = [], 0
    for s in slides:
        attrs = json.loads(s["attributes"]) if s.get("attributes") else {}
        kind = slide_kind(s)
        subtype = (attrs.get("subtype") or None) if kind == TUMOUR else None
        if kind == TUMOUR and subtypes and s["patient_id"] in subtypes:
            disagree += subtype is not None and subtype != subtypes[s["patient_id"]]
            subtype = subtypes[s["patient_id"]]
        rows.append({"slide_id": s["slide_id"], "patient_id": s["patient_id"],
                     "tumor": None if kind is None else kind == TUMOUR, "subtype": subtype,
                     "source": "manifest" if "sample_type" in attrs else "barcode"})
    if disagree:
        log.warning("%d tumour slides have a subtype attribute other than their patient's given subtype; the "
                    "patient's is used", disagree)
    return pd.DataFrame(rows, columns=["slide_id", "patient_id", "tumor", "subtype", "source"])


def class_counts(slides: pd.DataFrame) -> pd.DataFrame:
    """Slides per class of each slide task: tumour vs normal, and LUAD vs LUSC among tumour slides."""
    rows = []
    tumour = slides.tumor.dropna()
    for name, value in (("tumor", True), ("normal", False)):
        rows.append({"task": "tumor", "class": name, "n": int((tumour == value).sum())})
    subtypes = slides[slides.tumor == True].subtype.dropna()  # noqa: E712 -- a nullable column
    for name in sorted(subtypes.unique()):
        rows.append({"task": "subtype", "class": name, "n": int((subtypes == name).sum())})
    return pd.DataFrame(rows, columns=["task", "class", "n"])


class FoldPlanError(ExpressionFileError):
    """The folds cannot be planned as ``labels.folds_by`` asks; the message names the slides or sites and why.
    (An ExpressionFileError: `histcode labels ingest` reports it as a refusal of its inputs, not a traceback.)"""


@dataclass(frozen=True)
class FoldChoice:
    """What the cross-validation folds group by (``patient`` or ``site``) and why."""

    by: Literal["patient", "site"]
    reason: str


def slide_sites(slides: list[dict]) -> dict[str, str | None]:
    """Each slide's tissue-source site: its ``site`` attribute (a manifest column) where it has one, else the TSS
    field of its TCGA slide or patient barcode; None when it has neither."""
    sites: dict[str, str | None] = {}
    for s in slides:
        attrs = json.loads(s["attributes"]) if s.get("attributes") else {}
        given = str(attrs.get("site") or "").strip()
        sites[s["slide_id"]] = given or tissue_source_site(s["slide_id"]) or tissue_source_site(s["patient_id"])
    return sites


def _named(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _site_problem(frame: pd.DataFrame, site: pd.Series, folds: int) -> str | None:
    """Why the labelled slides of ``frame`` cannot be split by site into ``folds`` folds (None: they can)."""
    missing = frame.slide_id[site.isna()].astype(str).tolist()
    if missing:
        plural = "s" if len(frame) != 1 else ""
        return (f"{len(missing)} of {len(frame)} labelled slide{plural} have no site (no `site` attribute and no TCGA "
                f"barcode): {_named(missing)}")
    per_patient = site.groupby(frame.patient_id).nunique()
    split = per_patient[per_patient > 1].index.astype(str).tolist()
    if split:
        return f"patients with slides of more than one site (a patient must stay in one fold): {_named(split)}"
    n_sites = site.nunique()
    if n_sites < folds:
        return (f"{n_sites} site{'s' if n_sites != 1 else ''} ({_named(sorted(site.unique()))}) for {folds} folds: "
                "every fold needs a site of its own")
    return None


def choose_folds_by(frame: pd.DataFrame, site: pd.Series, folds: int,
                    folds_by: Literal["auto", "patient", "site"]) -> FoldChoice:
    """``labels.folds_by`` resolved for the labelled slides of ``frame`` (``site``: their sites, aligned with it):
    ``site`` or, for ``auto``, site folds when every slide has a site and there are at least ``folds`` sites, else
    patient folds. Raises FoldPlanError when ``site`` is asked for and cannot be had."""
    if folds_by == "patient":
        return FoldChoice("patient", "labels.folds_by = patient")
    problem = _site_problem(frame, site, folds)
    if folds_by == "site":
        if problem is not None:
            raise FoldPlanError(f"labels.folds_by = site: {problem}; give the slides a `site` manifest column, lower "
                                "labels.folds, or set labels.folds_by to patient or auto")
        return FoldChoice("site", f"labels.folds_by = site: {site.nunique()} sites for {folds} folds")
    if problem is not None:
        return FoldChoice("patient", f"labels.folds_by = auto: patient folds, as {problem}")
    return FoldChoice("site", f"labels.folds_by = auto: site folds, as every labelled slide has a site and there are "
                              f"{site.nunique()} sites for {folds} folds")


def plan_folds(slides: pd.DataFrame, folds: int, seed: int, folds_by: Literal["auto", "patient", "site"] = "patient",
               sites: dict[str, str | None] | None = None) -> tuple[pd.DataFrame, FoldChoice]:
    """Folds for the heads, stratified by each slide's tumour subtype (or tumour status), grouped by patient or,
    as ``folds_by`` resolves (``choose_folds_by``), by tissue-source site (``sites``: each slide's): every slide of
    a group, and so every patient of a site, in one fold. Fewer patients than folds: no folds (-1; the gate says)."""
    from sklearn.model_selection import StratifiedGroupKFold

    frame = slides.dropna(subset=["tumor"]).reset_index(drop=True)
    site = frame.slide_id.map(sites or {})
    choice = choose_folds_by(frame, site, folds, folds_by)
    log.info("cross-validation folds by %s (%s)", choice.by, choice.reason)
    groups = site if choice.by == "site" else frame.patient_id
    if frame.patient_id.nunique() < folds:
        return pd.DataFrame({"slide_id": frame.slide_id, "patient_id": frame.patient_id, "fold": -1}), choice
    strata = frame.subtype.fillna(frame.tumor.map({True: "tumor", False: "normal"})).astype(str)
    fold = np.full(len(frame), -1)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(frame, strata, groups)):
        fold[test] = k
    return pd.DataFrame({"slide_id": frame.slide_id, "patient_id": frame.patient_id, "fold": fold}), choice
