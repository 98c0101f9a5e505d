"""Patient-level predictions (``histcode.heads.patients``) made from the slides' and stored in the catalog's
``patient_predictions`` table: out of fold after `histcode heads` (from the cross-validation's slide rows), and
after `histcode predict` (from the predicted slides' rows, or with ``predict.patient_pooling: bag`` from one bag
of the patient's tiles per head).

Only fresh rows (of each task's ``@best`` version) are pooled, and only patients with a slide of that source;
a patient's slides of every cohort are pooled together (a patient's second slide predicted later joins its first).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import pandas as pd

from histcode.heads.apply import LoadedHead
from histcode.heads.data import Bag
from histcode.heads.outputs import Output, class_outputs, de_outputs
from histcode.heads.patients import Pooling, merged_bag_arrays, pool_outputs, slides_for_task
from histcode.store.catalog import Catalog
from histcode.store.patient_predictions import write_patient_predictions

log = logging.getLogger(__name__)

BAG_TASKS = ("subtype", "de")  # tasks whose registered head `bag` pooling runs on the merged bag (others: mean)


def _fresh_rows(catalog: Catalog, source: str, patients: Iterable[str] | None) -> pd.DataFrame:
    sql = ("SELECT p.*, s.patient_id FROM predictions p JOIN slides s USING (slide_id) "
           "WHERE p.source = ? AND NOT p.stale")
    rows = pd.DataFrame(catalog.query(sql, [source]))
    if rows.empty:
        return rows
    rows["patient_id"] = rows["patient_id"].fillna(rows["slide_id"])
    if patients is not None:
        rows = rows[rows["patient_id"].isin(set(patients))]
    return rows


def _outputs(frame: pd.DataFrame) -> dict[str, list[Output]]:
    out: dict[str, list[Output]] = defaultdict(list)
    for r in frame.itertuples(index=False):
        value = None if r.value is None or (isinstance(r.value, float) and np.isnan(r.value)) else float(r.value)
        out[r.slide_id].append(Output(r.output, value, r.call))
    return dict(out)


def pooled_rows(catalog: Catalog, source: str, pooling: Pooling, patients: Iterable[str] | None = None,
                bagged: dict[tuple[str, str], list[Output]] | None = None) -> pd.DataFrame:
    """Patient rows (``histcode.store.patient_predictions.COLUMNS`` but stale and predicted_at) from the fresh
    ``source`` rows of ``predictions``. ``bagged``: (patient, task) -> outputs already computed from a merged bag
    (``pooling='bag'``), used instead of pooling the slides' outputs."""
    rows = _fresh_rows(catalog, source, patients)
    if rows.empty:
        return pd.DataFrame()
    out = []
    for patient, mine in rows.groupby("patient_id", sort=True):
        tumor = mine[(mine.task == "tumor") & (mine.output == "p_tumor")]
        p_tumor = {r.slide_id: (None if pd.isna(r.value) else float(r.value)) for r in tumor.itertuples(index=False)}
        for (task, model, version), task_rows in mine.groupby(["task", "model", "version"], sort=True):
            chosen = slides_for_task(task, sorted(task_rows.slide_id.unique()), p_tumor)
            if (patient, task) in (bagged or {}):
                outputs, how = bagged[(patient, task)], "bag"
            else:
                outputs = pool_outputs(task, _outputs(task_rows[task_rows.slide_id.isin(chosen)]), pooling, p_tumor)
                how = "max" if task == "tumor" else ("mean" if pooling == "bag" else pooling)
            for o in outputs:
                out.append({"patient_id": patient, "task": task, "model": model, "version": int(version),
                            "source": source, "pooling": how, "output": o.name, "value": o.value, "call": o.call,
                            "n_slides": len(chosen), "slide_ids": list(chosen)})
    return pd.DataFrame(out)


def bag_outputs(heads: dict[str, LoadedHead], bags: dict[str, dict[str, Bag]], slides: list[str], task: str,
                p_tumor: float | None) -> list[Output] | None:
    """``task``'s registered head on the merged bag of ``slides`` (bags: view id -> slide -> bag); None for a task
    `bag` pooling does not run a head for (it is pooled by the mean instead)."""
    head = heads.get(task)
    if head is None or task not in BAG_TASKS:
        return None
    merged = merged_bag_arrays([bags[head.view_id][s].features for s in slides if s in bags.get(head.view_id, {})])
    out, _ = head(merged)
    if task == "subtype":
        return class_outputs("subtype", head.classes, out)
    return de_outputs(head.genes, head.classes, head.classified_genes, out, p_tumor)


def store_patient_predictions(catalog: Catalog, source: str, pooling: Pooling, current: dict[str, int],
                              patients: Iterable[str] | None = None,
                              bagged: dict[tuple[str, str], list[Output]] | None = None) -> int:
    """Pool and store the patients' rows of ``source``; ``current``: task -> ``@best``'s version (for staleness)."""
    frame = pooled_rows(catalog, source, pooling, patients, bagged)
    written = write_patient_predictions(catalog, frame, current)
    if written:
        n = frame["patient_id"].nunique()
        several = frame.loc[frame["n_slides"] > 1, "patient_id"].nunique()
        log.info("patient-level predictions (%s, pooling %s): %d patients, %d of them over several slides", source,
                 pooling, n, several)
    return written


def bagged_outputs(ws, catalog: Catalog, heads: dict[str, LoadedHead], patients: Iterable[str]
                   ) -> dict[tuple[str, str], list[Output]]:
    """For ``pooling='bag'``: (patient, task) -> the registered head's outputs on one bag of the patient's pooled
    slides (those with fresh `histcode predict` rows), for the tasks in ``BAG_TASKS``."""
    from histcode.apps.heatmaps import slide_bag
    from histcode.store.predictions import PREDICT

    rows = _fresh_rows(catalog, PREDICT, patients)
    out: dict[tuple[str, str], list[Output]] = {}
    if rows.empty:
        return out
    for patient, mine in rows.groupby("patient_id", sort=True):
        tumor = mine[(mine.task == "tumor") & (mine.output == "p_tumor")]
        p_tumor = {r.slide_id: (None if pd.isna(r.value) else float(r.value)) for r in tumor.itertuples(index=False)}
        for task in BAG_TASKS:
            head = heads.get(task)
            if head is None:
                continue
            slides = slides_for_task(task, sorted(mine.loc[mine.task == task, "slide_id"].unique()), p_tumor)
            if len(slides) < 2:
                continue  # one slide: its own outputs, pooled as they are
            try:
                bags = {head.view_id: {s: slide_bag(ws, head, s) for s in slides}}
                best = max((p for s, p in p_tumor.items() if s in slides and p is not None), default=None)
                outputs = bag_outputs(heads, bags, slides, task, best)
            except (LookupError, ValueError) as exc:
                log.warning("patient %s, %s: no merged bag (%s); its slides' outputs are pooled by the mean", patient,
                            task, exc)
                continue
            if outputs is not None:
                out[(patient, task)] = outputs
    return out


def patient_cv_metrics(catalog: Catalog, tasks: Iterable[str] = ("tumor", "subtype"), bootstrap: int = 1000,
                       seed: int = 0) -> dict[str, dict[str, float]]:
    """Patient-level metrics of the out-of-fold patient rows against the patients' labels: ``tumor`` (a patient has
    tumour when any of its slides is labelled tumour) and ``subtype`` (the subtype of its tumour slides), as AUC and
    accuracy with 95% intervals over patient resamples. Patients of one slide count too (their slide is their
    prediction); tasks without rows or with one class are left out."""
    from histcode.heads import metrics
    from histcode.store.predictions import CV

    labels = pd.DataFrame(catalog.query("SELECT l.slide_id, coalesce(l.patient_id, s.patient_id, l.slide_id) AS patient_id, "
                                        "l.tumor, l.subtype FROM slide_labels l JOIN slides s USING (slide_id)"))
    rows = pd.DataFrame(catalog.query("SELECT * FROM patient_predictions WHERE source = ? AND NOT stale", [CV]))
    out: dict[str, dict[str, float]] = {}
    if labels.empty or rows.empty:
        return out
    for task in tasks:
        mine = rows[rows.task == task]
        if mine.empty:
            continue
        if task == "tumor":
            truth = labels.groupby("patient_id")["tumor"].any().astype(int)
            p = mine[mine.output == "p_tumor"].set_index("patient_id")["value"]
            classes = ["normal", "tumor"]
            proba = pd.DataFrame({"normal": 1 - p, "tumor": p})
        else:
            tumour = labels[labels.tumor.fillna(False).astype(bool) & labels.subtype.notna()]
            named = tumour.groupby("patient_id")["subtype"].agg(lambda s: s.mode().iloc[0])
            wide = mine.pivot_table(index="patient_id", columns="output", values="value", aggfunc="first")
            classes = sorted(c.removeprefix("p_") for c in wide.columns)
            proba = wide[[f"p_{c}" for c in classes]].set_axis(classes, axis=1)
            truth = named.str.lower().map({c: i for i, c in enumerate(classes)})
        both = proba.index.intersection(truth.dropna().index)
        y = truth.loc[both].astype(int).to_numpy()
        if len(both) < 2 or len(np.unique(y)) < 2:
            continue
        probs = proba.loc[both].to_numpy(dtype=float)
        probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)
        scored = metrics.classification(y, probs)
        intervals = metrics.bootstrap_classification(y, probs, np.asarray(both), ("auc", "accuracy"), bootstrap, seed)
        out[task] = {"patients": float(len(both)), "auc": scored["auc"], "auc_low": intervals["auc"][0],
                     "auc_high": intervals["auc"][1], "accuracy": scored["accuracy"],
                     "accuracy_low": intervals["accuracy"][0], "accuracy_high": intervals["accuracy"][1]}
    return out
