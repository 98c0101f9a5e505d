"""Train, evaluate and register the heads on the training cohorts' vectors of a feature view.

Nothing trains unless the current label set passed the gate. The Lance state the heads train on is tagged
(``heads-<label set>``) and recorded on every run, so the exact vectors can be read back later. Each
(task, aggregator) is one MLflow parent run (``head_runs``); one whose inputs are unchanged is reused, not
trained again, unless ``force``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from histcode.apps.head_runs import prior_run, read_back, register_final, track_cv
from histcode.config import HistcodeConfig
from histcode.features.registry import FeatureView, load_view
from histcode.features.upkeep import tag_version
from histcode.heads import CODE_VERSION
from histcode.heads.cv import CVResult, cross_validate
from histcode.heads.data import load_bags
from histcode.heads.masks import attention_mask_auc
from histcode.heads.names import MODEL_NAMES
from histcode.heads.tasks import TASKS, task_data
from histcode.labels.run import gx_project, require_passed_gate
from histcode.store.catalog import Catalog
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, connect, open_table
from histcode.tracking import Tracker
from histcode.workspace import Workspace

log = logging.getLogger(__name__)


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
    cohorts: list[str] = field(default_factory=list)  # the training cohorts whose slides the heads read
    reused: list[str] = field(default_factory=list)  # "task/aggregator" keys taken from earlier runs

    def summary(self) -> dict:
        out = {"view_id": self.view.view_id, "encoder_uri": self.view.encoder_uri, "label_version": self.label_version,
               "lance_tag": self.lance_tag, "best": self.best, "fingerprint": self.fingerprint, "cohorts": self.cohorts,
               "reused": self.reused, "runs": {}}
        for r in self.results:
            key = f"{r.task.name}/{r.aggregator}"
            out["runs"][key] = {"run_id": self.runs.get(key), "version": self.versions.get(key),
                                **{k: round(v, 4) for k, v in r.pooled.items()},
                                **{f"strict_{k}": round(v, 4) for k, v in r.strict.items()}}
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


def view_state(catalog: Catalog, view: FeatureView, cohorts: list[str]) -> list[tuple[str, str, int]]:
    """(slide, content hash, rows) of the training cohorts' slides this view has embedded: what the heads read.
    Vectors of other cohorts (predicted slides) and compactions of the tables do not change it."""
    training = {s["slide_id"] for s in catalog.tiled_slides(view.spec_id, cohorts)}
    rows = catalog.query("SELECT slide_id, content_hash, rows FROM materializations WHERE view_id = ? AND status = 'ok' "
                         "ORDER BY slide_id", [view.view_id])
    return [(r["slide_id"], r["content_hash"], int(r["rows"])) for r in rows if r["slide_id"] in training]


# heads settings that choose what is trained or where, not how: not part of a head's fingerprint
NOT_LEARNING = {"tasks", "aggregators", "register_models", "device", "view"}


def _fingerprint(view: FeatureView, state: list, label_version: str, cfg: HistcodeConfig,
                 tasks: tuple[str, ...], aggregators: tuple[str, ...]) -> str:
    payload = {"view": view.view_id, "state": state, "labels": label_version, "code": CODE_VERSION,
               "heads": cfg.heads.model_dump(mode="json", exclude=NOT_LEARNING),
               "tasks": list(tasks), "aggregators": list(aggregators)}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _encoder_tags(tracker: Tracker, view: FeatureView) -> dict:
    """The registered encoder's version tags (method, architecture, the folds it left out), or {}."""
    try:
        return dict(tracker.client.get_model_version(view.model_name, view.model_version).tags)
    except Exception:  # noqa: BLE001 -- an encoder registered elsewhere: nothing known about it
        return {}


def _strict_folds(tags: dict, label_version: str) -> frozenset[int]:
    """The folds whose patients the view's encoder was not pretrained on (pretrain.exclude_test_folds), when
    they are folds of this label set."""
    folds = [int(f) for f in tags.get("excluded_folds", "").split(",") if f]
    if folds and tags.get("excluded_folds_label_version") != label_version:
        log.warning("the encoder left out folds %s of label set %s, not of the current %s: no strict metrics",
                    folds, tags.get("excluded_folds_label_version"), label_version)
        return frozenset()
    return frozenset(folds)


def completed_heads(ws: Workspace, cfg: HistcodeConfig, summary_path: Path) -> dict | None:
    """The summary at ``summary_path`` if it describes heads trained on exactly the current feature view state,
    label set and heads config, with its MLflow runs still FINISHED; None means training would do new work."""
    if not summary_path.is_file() or not ws.catalog_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    try:
        catalog = Catalog.of(ws)
        labels = require_passed_gate(catalog)
        view = load_view(catalog, cfg.heads.view, cfg.features.attribute_columns)
        state = view_state(catalog, view, catalog.training_cohorts(cfg.cohorts.train))
        current = _fingerprint(view, state, labels["label_version"], cfg, cfg.heads.tasks, cfg.heads.aggregators)
        tracker = Tracker(ws)
        finished = all(tracker.client.get_run(r["run_id"]).info.status == "FINISHED" for r in summary["runs"].values())
    except Exception:  # noqa: BLE001 -- no gate, no view, a deleted run: not up to date
        return None
    return summary if finished and summary.get("fingerprint") == current else None


def train_heads(ws: Workspace, cfg: HistcodeConfig, tasks: tuple[str, ...] | None = None,
                aggregators: tuple[str, ...] | None = None, view_id: str | None = None,
                force: bool = False) -> HeadsReport:
    """Cross-validate (and register) every task x aggregator on the training cohorts' slides of the view.
    ``force`` trains again even where an earlier run has exactly these inputs."""
    hcfg = cfg.heads
    catalog = Catalog.of(ws)
    labels = require_passed_gate(catalog)
    view = load_view(catalog, view_id or hcfg.view, cfg.features.attribute_columns)
    tasks, aggregators = tasks or hcfg.tasks, aggregators or hcfg.aggregators
    cohorts = catalog.training_cohorts(cfg.cohorts.train)
    state = view_state(catalog, view, cohorts)
    if not state:
        raise ValueError(f"view {view.view_id} holds no vectors of the training cohorts {cohorts}: run `histcode embed`")
    label_version = labels["label_version"]
    tag = _tag_state(ws, view, label_version)
    tracker = Tracker(ws)
    encoder_tags = _encoder_tags(tracker, view)
    strict = _strict_folds(encoder_tags, label_version)
    report = HeadsReport(view, label_version, tag, cohorts=cohorts,
                         fingerprint=_fingerprint(view, state, label_version, cfg, tasks, aggregators))
    bags = load_bags(ws, view, as_of=tag, slide_ids=[s for s, _, _ in state])
    log.info("heads on view %s: %d slides of cohorts %s, label set %s", view.view_id, len(bags), ", ".join(cohorts),
             label_version)
    docs = gx_project(ws) / "gx" / "uncommitted" / "data_docs" / "local_site"
    masks = {s["slide_id"]: s for s in catalog.slides(status="ok")}
    params = {"heads": hcfg.model_dump(mode="json"), "encoder": encoder_tags.get("encoder")}  # logged on every run
    for task in tasks:
        data = task_data(catalog, task, bags)
        scores = {}
        for aggregator in aggregators:
            if aggregator not in TASKS[task].aggregators:
                continue  # e.g. max-instance MIL has no fold-change form
            key = f"{task}/{aggregator}"
            fingerprint = _fingerprint(view, state, label_version, cfg, (task,), (aggregator,))
            prior = None if force else prior_run(tracker, fingerprint)
            if prior is not None:
                result, mask_auc = read_back(tracker, prior, data, aggregator)
                run_id = prior.info.run_id
                report.reused.append(key)
                log.info("%s: inputs unchanged, reusing MLflow run %s", key, run_id)
            else:
                result = cross_validate(data, bags, aggregator, hcfg, strict)
                mask_auc = attention_mask_auc(result, bags, masks) if task == "tumor" else None
                run_id = track_cv(tracker, result, view, labels, tag, params, docs, mask_auc, fingerprint, cohorts,
                                  strict)
            if task == "tumor" and mask_auc is not None:
                report.mask_auc[aggregator] = mask_auc
            report.results.append(result)
            report.runs[key] = run_id
            if hcfg.register_models:
                report.versions[key] = register_final(tracker, data, bags, aggregator, hcfg, view, labels, tag,
                                                      run_id, result.score)
            elif prior is not None and prior.info.status != "FINISHED":
                tracker.end_run(run_id)  # its cross-validation was complete: adopted as it is
            scores[aggregator] = result.score
        if hcfg.register_models and scores:
            finite = {a: s for a, s in scores.items() if np.isfinite(s)}
            best = max(finite, key=finite.get) if finite else next(iter(scores))
            tracker.client.set_registered_model_alias(MODEL_NAMES[task], "best", report.versions[f"{task}/{best}"])
            report.best[task] = best
    return report
