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
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histcode.features.registry import FeatureView
from histcode.heads.cv import CVResult, fit_on, validation
from histcode.heads.fit import GUIDED
from histcode.heads.masks import MASK_AUC
from histcode.heads.data import Bag
from histcode.heads.models import WithTileScores
from histcode.heads.names import MODEL_NAMES
from histcode.heads.tasks import TaskData
from histcode.runtime import failpoint
from histcode.tracking import Tracker
from histcode.viz import plots

log = logging.getLogger(__name__)

EXPERIMENT = "heads"
FINGERPRINT_TAG = "histcode.fingerprint"
CV_COMPLETE_TAG = "histcode.cv_complete"
STRICT = "strict_"  # metric prefix: pooled over the folds the encoder was not pretrained on
ATTENTION_FILE = "attention.npz"  # out-of-fold attention of every tested slide


def track_cv(tracker: Tracker, result: CVResult, view: FeatureView, labels: dict, tag: str, params: dict,
             docs: Path, mask: dict[str, float], fingerprint: str, cohorts: list[str],
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
            if "aggregator" in fold:
                fold_tags["histcode.chosen_aggregator"] = str(fold["aggregator"])
            with tracker.run(EXPERIMENT, f"{task.name}-{agg}-fold{fold['fold']}", parent=parent, tags=fold_tags) as child:
                tracker.log_metrics(child, {k: v for k, v in fold.items() if isinstance(v, (int, float)) and np.isfinite(v)})
        pooled = {k: v for k, v in result.pooled.items() if np.isfinite(v)}
        pooled.update({STRICT + k: v for k, v in result.strict.items() if np.isfinite(v)})
        pooled.update({k: v for k, v in mask.items() if np.isfinite(v)})  # attention vs tumour masks (tumour task)
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
    if result.outputs:  # out-of-fold outputs, so that a reused run can take part in a later selection
        ids = sorted(result.outputs)
        np.savez_compressed(out / "outputs.npz", slide_id=np.array(ids, dtype=object).astype(str),
                            outputs=np.stack([result.outputs[s] for s in ids]))
    if result.attention:  # out-of-fold attention: honest attention pooling for retrieval, mask AUCs of reused runs
        ids = sorted(result.attention)
        sizes = np.array([len(result.attention[s]) for s in ids])
        np.savez_compressed(out / ATTENTION_FILE, slide_id=np.array(ids, dtype=object).astype(str),
                            offsets=np.concatenate([[0], np.cumsum(sizes)]),
                            attention=np.concatenate([result.attention[s] for s in ids]).astype(np.float32))


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
    """A completed cross-validation as its run recorded it: (result, its attention-vs-mask metrics)."""
    metrics = run.data.metrics
    result = CVResult(data.kind.tested(data), aggregator,
                      pooled={k: v for k, v in metrics.items() if not _is_mask(k) and not k.startswith(STRICT)},
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
        if "outputs.npz" in names:
            with np.load(local("outputs.npz")) as saved:
                result.outputs = dict(zip(saved["slide_id"].tolist(), saved["outputs"]))
        if ATTENTION_FILE in names:
            result.attention = _read_attention(local(ATTENTION_FILE))
    return result, {k: v for k, v in metrics.items() if _is_mask(k)}


def _read_attention(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as saved:
        offsets, values = saved["offsets"], saved["attention"]
        return {sid: values[a:b] for sid, a, b in zip(saved["slide_id"].tolist(), offsets[:-1], offsets[1:])}


def out_of_fold_attention(tracker: Tracker, run_id: str) -> dict[str, np.ndarray]:
    """Slide id -> the attention each tested slide got from the fold model that never saw its patient, as the
    cross-validation run ``run_id`` logged it; {} for a run that logged none (before they were kept)."""
    names = {a.path for a in tracker.client.list_artifacts(run_id)}
    if ATTENTION_FILE not in names:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        return {k: v.copy() for k, v in _read_attention(
            Path(tracker.client.download_artifacts(run_id, ATTENTION_FILE, tmp))).items()}


def _is_mask(metric: str) -> bool:
    """A metric of attention against the tumour masks (``histcode.heads.masks.mask_metrics``)."""
    return metric.startswith(MASK_AUC) or metric.startswith("n_mask_")


def _version_tags(data: TaskData, aggregator: str, view: FeatureView, labels: dict, tag: str, score: float) -> dict:
    return {"task": data.name, "aggregator": aggregator, "view_id": view.view_id, "encoder_uri": view.encoder_uri,
            "method": str(view.method), "label_version": labels["label_version"], "lance_tag": tag,
            "classes": ",".join(data.classes), "genes": ",".join(data.genes), "cv_score": score,
            "classified_genes": ",".join(g for g, keep in zip(data.genes, data.gene_included) if keep)
            if data.gene_included is not None else ""}


@dataclass
class Registered:
    """A registered final model and its inner-validation figures (what ``@best`` is chosen by)."""

    version: str
    val_score: float
    val_loss: float


def registered_version(tracker: Tracker, task: str, run_id: str) -> str | None:
    versions = tracker.client.search_model_versions(f"name = '{MODEL_NAMES[task]}' and run_id = '{run_id}'")
    return str(max(int(v.version) for v in versions)) if versions else None


def _number(tags: dict, key: str) -> float:
    try:
        return float(tags.get(key, "nan"))
    except ValueError:
        return math.nan


def register_final(tracker: Tracker, data: TaskData, bags: dict[str, Bag], aggregator: str, hcfg, view: FeatureView,
                   labels: dict, tag: str, run_id: str, score: float, guides=None) -> Registered:
    """The final model of (task, aggregator) for the run ``run_id``: the version the run already registered
    (a run a crash left unended gets its version's tags and is ended), else fitted on every labelled slide
    (early stopping on an inner patient split, whose validation score is tagged on the version), logged to the
    run and registered. Sets no alias (``promote`` does). The run ends FINISHED. ``guides``: fold -> tumour guide
    (``histcode.heads.guided``), needed by ``guided`` only."""
    name = MODEL_NAMES[data.name]
    tags = _version_tags(data, aggregator, view, labels, tag, score)
    version = registered_version(tracker, data.name, run_id)
    if version is not None:  # registered already: keep it (a run a crash left unended is ended now)
        if tracker.client.get_run(run_id).info.status != "FINISHED":
            log.info("%s/%s: adopting %s version %s of run %s", data.name, aggregator, name, version, run_id)
            for key, value in tags.items():
                tracker.client.set_model_version_tag(name, version, key, str(value))
            tracker.end_run(run_id)
        known = tracker.client.get_model_version(name, version).tags
        return Registered(version, _number(known, "val_score"), _number(known, "val_loss"))
    with tracker.closing(tracker.reopen_run(run_id)):
        guide = guides(None) if aggregator == GUIDED else None
        inner = fit_on(data, bags, np.arange(len(data.slide_ids)), aggregator, hcfg, hcfg.seed, guide)
        head, val = inner.head, validation(data, bags, inner.head, inner.select)
        _, version = tracker.log_torch_model(run_id, WithTileScores(head.model), "head", (view.dim,), None, name,
                                             version_tags={**tags, **val})
        failpoint("heads.registered")
    return Registered(version, val["val_score"], val["val_loss"])


@dataclass
class Promotion:
    alias: str
    version: str  # the version the alias points at afterwards
    moved: bool
    reason: str


def promote(tracker: Tracker, task: str, alias: str, version: str, score: float, label_version: str,
            score_tag: str, force: bool = False) -> Promotion:
    """Point ``alias`` at ``version`` when it has no version yet, when its version was scored on another label
    set, when ``score`` beats that version's ``score_tag`` (strictly), or when ``force``; otherwise leave it.
    ``score`` is tagged on ``version`` as ``score_tag`` when the alias moves, and ``<alias>_selected_on``
    says whether that score also chose it (``outer_cv``: it beat the version before on the same outer folds,
    so as an estimate of the new version it is optimistic, the winner's curse of keeping the maximum of noisy
    scores; ``none``: the first version, a new label set, or promoted by request)."""
    name = MODEL_NAMES[task]
    client = tracker.client
    try:
        current = client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 -- no such alias yet
        current = None
    if current is not None and str(current.version) == str(version):
        return Promotion(alias, version, False, "already there")
    reason = None
    if force:
        reason = "promoted by request"
    elif current is None:
        reason = "first version"
    elif current.tags.get("label_version") != label_version:
        reason = f"label set changed ({current.tags.get('label_version')} -> {label_version})"
    else:
        held = _number(current.tags, score_tag)
        if math.isfinite(score) and (not math.isfinite(held) or score > held):
            reason = f"{score_tag} {score:.4f} > {held:.4f} of version {current.version}"
        else:
            log.info("%s@%s stays on version %s (%s %.4f); version %s scored %.4f", name, alias, current.version,
                     score_tag, held, version, score)
            return Promotion(alias, str(current.version), False,
                             f"version {current.version} scores {held:.4f} >= {score:.4f}")
    client.set_model_version_tag(name, version, score_tag, str(score))
    # a version that won on its outer-CV score carries that score as chosen by it: an optimistic estimate
    selected = "outer_cv" if reason.startswith(score_tag) else "none"
    client.set_model_version_tag(name, version, f"{alias}_selected_on", selected)
    client.set_registered_model_alias(name, alias, version)
    log.info("%s@%s -> version %s (%s)", name, alias, version, reason)
    return Promotion(alias, str(version), True, reason)


def set_alias(tracker: Tracker, task: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version`` unconditionally (ablation aliases)."""
    tracker.client.set_registered_model_alias(MODEL_NAMES[task], alias, version)
