"""The MLflow side of the heads: one parent run per (task, aggregator, view) with a child run per fold, plots
and tables as artifacts, the label gate's Data Docs attached, the final model registered.

Every parent run carries the fingerprint of what it was trained from (view state, label set, heads config,
task, aggregator). A rerun with the same fingerprint reuses a run whose cross-validation completed: its
metrics and tables are read back, and its registered version is adopted (or, if the process died before
registering, the final model is fitted and registered then). So an interrupted `histcode heads` resumes and
ends with exactly the versions an uninterrupted one registers, and an unchanged rerun trains nothing.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from histcode.features.registry import FeatureView
from histcode.heads.cv import CVResult, fit_on
from histcode.heads.data import Bag
from histcode.heads.names import MODEL_NAMES
from histcode.heads.tasks import TaskData
from histcode.runtime import failpoint
from histcode.tracking import Tracker
from histcode.viz import plots

log = logging.getLogger(__name__)

EXPERIMENT = "heads"
FINGERPRINT_TAG = "histcode.fingerprint"
CV_COMPLETE_TAG = "histcode.cv_complete"
MASK_AUC = "attention_mask_auc"
STRICT = "strict_"  # metric prefix: pooled over the folds the encoder was not pretrained on


def track_cv(tracker: Tracker, result: CVResult, view: FeatureView, labels: dict, tag: str, params: dict,
             docs: Path, mask_auc: float | None, fingerprint: str, cohorts: list[str],
             strict_folds: frozenset[int]) -> str:
    """The parent run of a cross-validation with its fold runs, metrics and artifacts; returns its id.
    ``params``: logged beside the run's own (the heads settings, the encoder architecture)."""
    task, agg = result.task, result.aggregator
    tags = {"histcode.task": task.name, "histcode.aggregator": agg, "histcode.view_id": view.view_id,
            "histcode.encoder_uri": view.encoder_uri, "histcode.label_version": labels["label_version"],
            "histcode.lance_tag": tag, "histcode.method": str(view.method), "histcode.cohorts": ",".join(cohorts),
            FINGERPRINT_TAG: fingerprint}
    with tracker.run(EXPERIMENT, f"{task.name}-{agg}-{view.view_id}", tags=tags) as parent:
        tracker.log_params(parent, {"task": task.name, "aggregator": agg, "view_id": view.view_id,
                                    "encoder_uri": view.encoder_uri, "method": str(view.method), "lance_tag": tag,
                                    "n_slides": len(task.slide_ids), "n_patients": len(set(task.patients)),
                                    "cohorts": cohorts, "strict_folds": sorted(strict_folds), **params})
        for fold in result.fold_metrics:
            fold_tags = {"histcode.fold": str(fold["fold"]),
                         "histcode.encoder_saw_fold": str(fold["fold"] not in strict_folds).lower()}
            with tracker.run(EXPERIMENT, f"{task.name}-{agg}-fold{fold['fold']}", parent=parent, tags=fold_tags) as child:
                tracker.log_metrics(child, {k: v for k, v in fold.items() if isinstance(v, (int, float)) and np.isfinite(v)})
        pooled = {k: v for k, v in result.pooled.items() if np.isfinite(v)}
        pooled.update({STRICT + k: v for k, v in result.strict.items() if np.isfinite(v)})
        if mask_auc is not None and np.isfinite(mask_auc):
            pooled[MASK_AUC] = mask_auc
        tracker.log_metrics(parent, pooled)
        with tempfile.TemporaryDirectory() as tmp:
            _write_tables(result, Path(tmp))
            tracker.log_artifacts(parent, Path(tmp))
        if docs.is_dir():
            tracker.log_artifacts(parent, docs, "label_gate_data_docs")
        tracker.set_tags(parent, {CV_COMPLETE_TAG: "true"})
        failpoint("heads.cv_logged")
    return parent


def _write_tables(result: CVResult, out: Path) -> None:
    task, agg = result.task, result.aggregator
    if result.predictions is not None:
        result.predictions.to_csv(out / "predictions.csv", index=False)
        y, proba = result.predictions.y.to_numpy(), result.predictions.filter(like="p_").to_numpy()
        if proba.shape[1] == 2 and len(np.unique(y)) == 2:
            plots.roc_curve_png(y, proba[:, 1], f"{task.name} / {agg}", out / "roc.png")
        plots.confusion_png(y, proba.argmax(axis=1), task.classes, f"{task.name} / {agg}", out / "confusion.png")
    if result.genes is not None:
        pd.DataFrame(result.genes).to_csv(out / "genes.csv", index=False)
        plots.fold_change_vs_auc_png(result.genes, f"DE / {agg}: |log2FC| vs AUC", out / "fold_change_vs_auc.png")
    (out / "fold_slides.json").write_text(json.dumps(result.fold_slides, indent=1))
    pd.DataFrame(result.fold_metrics).to_csv(out / "folds.csv", index=False)


def prior_run(tracker: Tracker, fingerprint: str):
    """The newest run of this fingerprint whose cross-validation completed, however it ended (FINISHED; KILLED
    or FAILED afterwards, while registering), or None. Runs left RUNNING by dead processes are ended first; one
    still RUNNING belongs to a live process and is not taken."""
    tracker.end_dead_runs_once()
    runs = tracker.client.search_runs(
        [tracker.experiment_id(EXPERIMENT)], max_results=50, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}' and tags.`{CV_COMPLETE_TAG}` = 'true'")
    return next((r for r in runs if r.info.status != "RUNNING"), None)


def read_back(tracker: Tracker, run, data: TaskData, aggregator: str) -> tuple[CVResult, float | None]:
    """A completed cross-validation as its run recorded it: (result, attention-vs-mask AUC)."""
    metrics = run.data.metrics
    result = CVResult(data, aggregator,
                      pooled={k: v for k, v in metrics.items() if k != MASK_AUC and not k.startswith(STRICT)},
                      strict={k[len(STRICT):]: v for k, v in metrics.items() if k.startswith(STRICT)})
    with tempfile.TemporaryDirectory() as tmp:
        names = {a.path for a in tracker.client.list_artifacts(run.info.run_id)}
        local = lambda name: Path(tracker.client.download_artifacts(run.info.run_id, name, tmp))  # noqa: E731
        if "predictions.csv" in names:
            result.predictions = pd.read_csv(local("predictions.csv"), dtype={"slide_id": str})
        if "genes.csv" in names:
            result.genes = pd.read_csv(local("genes.csv")).to_dict("records")
        if "folds.csv" in names:
            result.fold_metrics = pd.read_csv(local("folds.csv")).to_dict("records")
        if "fold_slides.json" in names:
            result.fold_slides = json.loads(local("fold_slides.json").read_text())
    return result, metrics.get(MASK_AUC)


def _version_tags(data: TaskData, aggregator: str, view: FeatureView, labels: dict, tag: str, score: float) -> dict:
    return {"task": data.name, "aggregator": aggregator, "view_id": view.view_id, "encoder_uri": view.encoder_uri,
            "label_version": labels["label_version"], "lance_tag": tag, "classes": ",".join(data.classes),
            "genes": ",".join(data.genes), "cv_score": score,
            "classified_genes": ",".join(g for g, keep in zip(data.genes, data.gene_included) if keep)
            if data.gene_included is not None else ""}


def registered_version(tracker: Tracker, task: str, run_id: str) -> str | None:
    versions = tracker.client.search_model_versions(f"name = '{MODEL_NAMES[task]}' and run_id = '{run_id}'")
    return str(max(int(v.version) for v in versions)) if versions else None


def register_final(tracker: Tracker, data: TaskData, bags: dict[str, Bag], aggregator: str, hcfg, view: FeatureView,
                   labels: dict, tag: str, run_id: str, score: float) -> str:
    """The final model of (task, aggregator) for the run ``run_id``: the version the run already registered
    (its alias set; a run a crash left unended gets its version's tags and is ended), else fitted on every
    labelled slide (early stopping on an inner patient split), logged to the run, registered and aliased by
    aggregator. The run ends FINISHED."""
    name = MODEL_NAMES[data.name]
    tags = _version_tags(data, aggregator, view, labels, tag, score)
    version = registered_version(tracker, data.name, run_id)
    if version is not None:  # registered already: keep it (a run a crash left unended is ended now)
        if tracker.client.get_run(run_id).info.status != "FINISHED":
            log.info("%s/%s: adopting %s version %s of run %s", data.name, aggregator, name, version, run_id)
            for key, value in tags.items():
                tracker.client.set_model_version_tag(name, version, key, str(value))
            tracker.end_run(run_id)
        tracker.client.set_registered_model_alias(name, aggregator, version)
        return version
    with tracker.closing(tracker.reopen_run(run_id)):
        head, _, _ = fit_on(data, bags, np.arange(len(data.slide_ids)), aggregator, hcfg, hcfg.seed)
        _, version = tracker.log_torch_model(run_id, head.model, "head", (view.dim,), None, name, aliases=(aggregator,),
                                             version_tags=tags)
        failpoint("heads.registered")
    return version
