"""Train, evaluate and register the heads: one MLflow parent run per (task, aggregator, view) with a child run
per fold, plots and tables as artifacts, the label gate's Data Docs attached, final models registered.

Nothing trains unless the current label set passed the gate. The Lance state the heads train on is tagged
(``heads-<label set>``) and recorded on every run, so the exact vectors can be read back later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from histcode.config import HistcodeConfig
from histcode.features.registry import FeatureView, load_view
from histcode.features.upkeep import tag_version
from histcode.heads.cv import CVResult, cross_validate, fit_on
from histcode.heads.data import Bag, load_bags
from histcode.heads.masks import attention_mask_auc
from histcode.heads.names import MODEL_NAMES
from histcode.heads.tasks import TASKS, TaskData, task_data
from histcode.labels.run import gx_project, require_passed_gate
from histcode.store.catalog import Catalog
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, connect, open_table
from histcode.tracking import Tracker
from histcode.viz import plots
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

EXPERIMENT = "heads"


@dataclass
class HeadsReport:
    view: FeatureView
    label_version: str
    lance_tag: str
    results: list[CVResult] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)  # "task/aggregator" -> parent run id
    versions: dict[str, str] = field(default_factory=dict)  # "task/aggregator" -> registered version
    best: dict[str, str] = field(default_factory=dict)  # task -> aggregator with the alias 'best'
    mask_auc: dict[str, float] = field(default_factory=dict)  # aggregator -> mean attention-vs-mask AUC
    fingerprint: str = ""  # view state + label set + heads config: equal fingerprints train the same heads

    def summary(self) -> dict:
        out = {"view_id": self.view.view_id, "encoder_uri": self.view.encoder_uri, "label_version": self.label_version,
               "lance_tag": self.lance_tag, "best": self.best, "fingerprint": self.fingerprint, "runs": {}}
        for r in self.results:
            key = f"{r.task.name}/{r.aggregator}"
            out["runs"][key] = {"run_id": self.runs.get(key), "version": self.versions.get(key),
                                **{k: round(v, 4) for k, v in r.pooled.items()}}
            if r.task.name == "tumor" and r.aggregator in self.mask_auc:
                out["runs"][key]["attention_mask_auc"] = round(self.mask_auc[r.aggregator], 4)
        return out

    def plot_tables(self) -> dict[str, pd.DataFrame]:
        """Tables for `dvc plots`, one per head: ``roc/<task>_<aggregator>`` (ROC points of binary heads, pooled
        over the test folds) and ``genes/de_<aggregator>`` (per-gene |log2FC|, AUC and correlations)."""
        from sklearn.metrics import roc_curve

        tables = {}
        for r in self.results:
            name = f"{r.task.name}_{r.aggregator}"
            if r.predictions is not None and len(r.task.classes) == 2 and r.predictions.y.nunique() == 2:
                fpr, tpr, _ = roc_curve(r.predictions.y, r.predictions[f"p_{r.task.classes[1]}"])
                tables[f"roc/{name}"] = pd.DataFrame({"fpr": fpr.round(4), "tpr": tpr.round(4)})
            if r.genes:
                tables[f"genes/{name}"] = pd.DataFrame(r.genes).round(4)
        return tables


def _tag_state(ws: Workspace, view: FeatureView, label_version: str) -> str:
    tag = f"heads-{label_version}"
    db = connect(ws.lancedb_uri)
    for kind in (TILE_KIND, SLIDE_KIND):
        tag_version(open_table(db, view.table(kind), create=False), tag)
    return tag


def _fingerprint(ws: Workspace, cfg: HistcodeConfig, view: FeatureView, label_version: str,
                 tasks: tuple[str, ...], aggregators: tuple[str, ...]) -> str:
    db = connect(ws.lancedb_uri)
    state = {"view": view.view_id, "lance": [open_table(db, view.table(k), create=False).version for k in (TILE_KIND, SLIDE_KIND)],
             "labels": label_version, "heads": cfg.heads.model_dump(mode="json"), "tasks": tasks, "aggregators": aggregators}
    return hashlib.sha1(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:16]


def completed_heads(ws: Workspace, cfg: HistcodeConfig, summary_path: Path) -> dict | None:
    """The summary at ``summary_path`` if it describes heads trained on exactly the current feature view state,
    label set and heads config, with its MLflow runs still FINISHED; None means training would do new work."""
    if not summary_path.is_file() or not ws.catalog_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    try:
        catalog = Catalog(ws.catalog_path)
        labels = require_passed_gate(catalog)
        view = load_view(catalog, cfg.heads.view, cfg.features.attribute_columns)
        current = _fingerprint(ws, cfg, view, labels["label_version"], cfg.heads.tasks, cfg.heads.aggregators)
        tracker = Tracker(ws)
        finished = all(tracker.client.get_run(r["run_id"]).info.status == "FINISHED" for r in summary["runs"].values())
    except Exception:  # noqa: BLE001 -- no gate, no view, a deleted run: not up to date
        return None
    return summary if finished and summary.get("fingerprint") == current else None


def train_heads(ws: Workspace, cfg: HistcodeConfig, tasks: tuple[str, ...] | None = None,
                aggregators: tuple[str, ...] | None = None, view_id: str | None = None) -> HeadsReport:
    hcfg = cfg.heads
    catalog = Catalog(ws.catalog_path)
    labels = require_passed_gate(catalog)
    view = load_view(catalog, view_id or hcfg.view, cfg.features.attribute_columns)
    tasks, aggregators = tasks or hcfg.tasks, aggregators or hcfg.aggregators
    fingerprint = _fingerprint(ws, cfg, view, labels["label_version"], tasks, aggregators)
    tag = _tag_state(ws, view, labels["label_version"])
    bags = load_bags(ws, view, as_of=tag)
    tracker = Tracker(ws)
    report = HeadsReport(view, labels["label_version"], tag, fingerprint=fingerprint)
    docs = gx_project(ws) / "gx" / "uncommitted" / "data_docs" / "local_site"
    masks = {s["slide_id"]: s for s in catalog.slides(status="ok")}
    for task in tasks:
        data = task_data(catalog, task, bags)
        scores = {}
        for aggregator in aggregators:
            if aggregator not in TASKS[task].aggregators:
                continue  # e.g. max-instance MIL has no fold-change form
            result = cross_validate(data, bags, aggregator, hcfg)
            report.results.append(result)
            key = f"{task}/{aggregator}"
            if task == "tumor":
                report.mask_auc[aggregator] = attention_mask_auc(result, bags, masks)
            report.runs[key] = _track(tracker, result, view, labels, tag, hcfg.model_dump(mode="json"), docs,
                                      report.mask_auc.get(aggregator) if task == "tumor" else None)
            if hcfg.register_models:
                report.versions[key] = _register(tracker, data, bags, aggregator, hcfg, view, labels, tag,
                                                 report.runs[key], result.score)
            scores[aggregator] = result.score
        if hcfg.register_models and scores:
            finite = {a: s for a, s in scores.items() if np.isfinite(s)}
            best = max(finite, key=finite.get) if finite else next(iter(scores))
            tracker.client.set_registered_model_alias(MODEL_NAMES[task], "best", report.versions[f"{task}/{best}"])
            report.best[task] = best
    return report


def _track(tracker: Tracker, result: CVResult, view: FeatureView, labels: dict, tag: str, params: dict,
           docs: Path, mask_auc: float | None) -> str:
    task, agg = result.task, result.aggregator
    parent = tracker.start_run(EXPERIMENT, f"{task.name}-{agg}-{view.view_id}", tags={
        "histcode.task": task.name, "histcode.aggregator": agg, "histcode.view_id": view.view_id,
        "histcode.encoder_uri": view.encoder_uri, "histcode.label_version": labels["label_version"],
        "histcode.lance_tag": tag, "histcode.method": str(view.method),
    })
    tracker.log_params(parent, {"task": task.name, "aggregator": agg, "view_id": view.view_id,
                                "encoder_uri": view.encoder_uri, "lance_tag": tag, "n_slides": len(task.slide_ids),
                                "n_patients": len(set(task.patients)), "heads": params})
    for fold in result.fold_metrics:
        child = tracker.start_run(EXPERIMENT, f"{task.name}-{agg}-fold{fold['fold']}", parent=parent,
                                  tags={"histcode.fold": str(fold["fold"])})
        tracker.log_metrics(child, {k: v for k, v in fold.items() if isinstance(v, (int, float)) and np.isfinite(v)})
        tracker.end_run(child)
    pooled = {k: v for k, v in result.pooled.items() if np.isfinite(v)}
    if mask_auc is not None and np.isfinite(mask_auc):
        pooled["attention_mask_auc"] = mask_auc
    tracker.log_metrics(parent, pooled)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
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
        tracker.log_artifacts(parent, out)
    if docs.is_dir():
        tracker.log_artifacts(parent, docs, "label_gate_data_docs")
    tracker.end_run(parent)
    return parent


def _register(tracker: Tracker, data: TaskData, bags: dict[str, Bag], aggregator: str, hcfg, view: FeatureView,
              labels: dict, tag: str, run_id: str, score: float) -> str:
    """The final model of (task, aggregator): fitted on every labelled slide (early stopping on an inner
    patient split), logged to the parent run, registered, aliased by aggregator."""
    head, _, _ = fit_on(data, bags, np.arange(len(data.slide_ids)), aggregator, hcfg, hcfg.seed)
    tracker.reopen_run(run_id)
    _, version = tracker.log_torch_model(
        run_id, head.model, "head", (view.dim,), None, MODEL_NAMES[data.name], aliases=(aggregator,),
        version_tags={"task": data.name, "aggregator": aggregator, "view_id": view.view_id,
                      "encoder_uri": view.encoder_uri, "label_version": labels["label_version"], "lance_tag": tag,
                      "classes": ",".join(data.classes), "genes": ",".join(data.genes), "cv_score": score,
                      "classified_genes": ",".join(g for g, keep in zip(data.genes, data.gene_included) if keep)
                      if data.gene_included is not None else ""},
    )
    tracker.end_run(run_id)
    return version
