"""Train, evaluate and register the heads on the training cohorts' vectors of a feature view.

Nothing trains unless the current label set passed the gate. The Lance state the heads train on is tagged
(``heads-<label set>``) and recorded on every run, so the exact vectors can be read back later. Each
(task, aggregator) is one MLflow parent run (``head_runs``); one whose inputs are unchanged is reused, not
trained again, unless ``force``. Each task also gets a ``best`` run: the choice among aggregators made inside
every outer fold from its selection split (``histcode.heads.select``), scored on the outer test folds;
that score is what ``@best`` is compared by, across runs (``head_runs.promote``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from histcode.apps.cv_predictions import best_versions, store_cv_predictions
from histcode.apps.head_runs import Promotion, prior_run, promote, read_back, register_final, set_alias, track_cv
from histcode.apps.patient_predictions import patient_cv_metrics, store_patient_predictions
from histcode.config import HistcodeConfig
from histcode.features.registry import FeatureView, resolve_view, training_state
from histcode.features.upkeep import tag_version
from histcode.heads import CODE_VERSION
from histcode.heads.cv import CVResult, cross_validate
from histcode.heads.data import load_bags
from histcode.heads.fit import GUIDED
from histcode.heads.guided import TumourGuides
from histcode.heads.masks import mask_metrics
from histcode.heads.names import MODEL_NAMES
from histcode.heads.smoothing import Smoothing
from histcode.heads.select import BEST, choose, chosen_counts, select_per_fold
from histcode.heads.survival import SurvivalRefused, km_curves, km_table
from histcode.heads.tasks import TASKS, task_data
from histcode.labels.run import gx_project, require_passed_gate
from histcode.store.catalog import Catalog
from histcode.store.predictions import CV
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, connect, open_table
from histcode.tracking import Tracker
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

KM_PICTURE = "kaplan_meier.png"  # a survival run's artifact: Kaplan-Meier of the out-of-fold high vs low risk groups


@dataclass
class HeadsReport:
    view: FeatureView
    label_version: str
    lance_tag: str
    results: list[CVResult] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)  # "task/aggregator" -> parent run id
    versions: dict[str, str] = field(default_factory=dict)  # "task/aggregator" -> registered version
    best: dict[str, str] = field(default_factory=dict)  # task -> aggregator the selection chose for the final model
    promotions: dict[str, list[Promotion]] = field(default_factory=dict)  # task -> what happened to each alias
    aliases: str = ""  # "" = production aliases; else the prefix of the ablation's own (ablation-<method>)
    mask_auc: dict[str, dict] = field(default_factory=dict)  # aggregator -> attention-vs-mask metrics (tumour)
    fingerprint: str = ""  # view state + label set + heads config: equal fingerprints train the same heads
    cohorts: list[str] = field(default_factory=list)  # the training cohorts whose slides the heads read
    reused: list[str] = field(default_factory=list)  # "task/aggregator" keys taken from earlier runs
    refused: dict[str, str] = field(default_factory=dict)  # task of heads.tasks skipped -> why (survival refused)
    patients: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> patient-level out-of-fold metrics

    def summary(self) -> dict:
        out = {"view_id": self.view.view_id, "encoder_uri": self.view.encoder_uri, "label_version": self.label_version,
               "lance_tag": self.lance_tag, "best": self.best, "fingerprint": self.fingerprint, "cohorts": self.cohorts,
               "reused": self.reused, "refused": self.refused,
               "patients": {t: {k: round(v, 4) for k, v in m.items()} for t, m in self.patients.items()},
               "aliases": {t: {p.alias: {"version": p.version, "moved": p.moved, "reason": p.reason}
                                                      for p in ps} for t, ps in self.promotions.items()},
               "runs": {}}
        for r in self.results:
            key = f"{r.task.name}/{r.aggregator}"
            out["runs"][key] = {"run_id": self.runs.get(key), "version": self.versions.get(key),
                                **({"chosen": chosen_counts(r)} if r.aggregator == BEST else {}),
                                **{k: round(v, 4) for k, v in r.pooled.items()},
                                **{f"strict_{k}": round(v, 4) for k, v in r.strict.items()}}
            if r.task.name == "tumor" and r.aggregator in self.mask_auc:
                out["runs"][key].update({k: round(v, 4) for k, v in self.mask_auc[r.aggregator].items()})
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
    for kind in ((SLIDE_KIND,) if view.slide_level else (TILE_KIND, SLIDE_KIND)):  # a slide encoder's view: no tiles
        tag_version(open_table(db, view.table(kind), create=False), tag)
    return tag


# heads settings that choose what is trained or where, not how: not part of a head's fingerprint
NOT_LEARNING = {"tasks", "aggregators", "register_models", "device", "view", "promote"}


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
        view = resolve_view(catalog, Tracker(ws), cfg, cfg.heads.view)
        state = training_state(catalog, view, catalog.training_cohorts(cfg.cohorts.train))
        current = _fingerprint(view, state, labels["label_version"], cfg, cfg.heads.tasks, cfg.heads.aggregators)
        tracker = Tracker(ws)
        finished = all(tracker.client.get_run(r["run_id"]).info.status == "FINISHED" for r in summary["runs"].values())
        # heads trained before predictions were stored: a rerun reuses every run and stores them
        stored = not cfg.heads.register_models or (bool(catalog.query(
            "SELECT 1 FROM predictions WHERE source = 'cv' AND view_id = ? LIMIT 1", [view.view_id])) and bool(
            catalog.query("SELECT 1 FROM patient_predictions WHERE source = 'cv' LIMIT 1")))
    except Exception:  # noqa: BLE001 -- no gate, no view, a deleted run: not up to date
        return None
    if not stored:
        return None
    return summary if finished and summary.get("fingerprint") == current else None


def train_heads(ws: Workspace, cfg: HistcodeConfig, tasks: tuple[str, ...] | None = None,
                aggregators: tuple[str, ...] | None = None, view_id: str | None = None,
                force: bool = False, ablation: str | None = None) -> HeadsReport:
    """Cross-validate (and register) every task x aggregator on the training cohorts' slides of the view, and
    the selection among the aggregators. ``force`` trains again even where an earlier run has exactly these
    inputs. ``ablation``: the encoder method of an ablation, whose versions get ``ablation-<method>-*`` aliases
    and leave the production aliases alone."""
    hcfg = cfg.heads
    catalog = Catalog.of(ws)
    labels = require_passed_gate(catalog)
    tracker = Tracker(ws)
    view = resolve_view(catalog, tracker, cfg, view_id or hcfg.view)
    asked_tasks = tasks
    tasks, aggregators = tasks or hcfg.tasks, aggregators or hcfg.aggregators
    cohorts = catalog.training_cohorts(cfg.cohorts.train)
    state = training_state(catalog, view, cohorts)
    if not state:
        raise ValueError(f"view {view.view_id} holds no vectors of the training cohorts {cohorts}: run `histcode embed`")
    label_version = labels["label_version"]
    tag = _tag_state(ws, view, label_version)
    encoder_tags = _encoder_tags(tracker, view)
    strict = _strict_folds(encoder_tags, label_version)
    report = HeadsReport(view, label_version, tag, cohorts=cohorts, aliases=f"ablation-{ablation}" if ablation else "",
                         fingerprint=_fingerprint(view, state, label_version, cfg, tasks, aggregators))
    bags = load_bags(ws, view, as_of=tag, slide_ids=[s for s, _, _ in state])
    log.info("heads on view %s (encoder %s, %s): %d slides of cohorts %s, label set %s", view.view_id,
             view.encoder_uri, view.method, len(bags), ", ".join(cohorts), label_version)
    docs = gx_project(ws) / "gx" / "uncommitted" / "data_docs" / "local_site"
    masks = {s["slide_id"]: s for s in catalog.slides(status="ok")}
    params = {"heads": hcfg.model_dump(mode="json"), "encoder": encoder_tags.get("encoder")}  # logged on every run
    context = (tracker, view, labels, tag, params, docs, cohorts, strict, hcfg)
    guides, no_guide = _tumour_guides(catalog, bags, hcfg) if GUIDED in aggregators else (None, None)
    asked = bool(asked_tasks)  # tasks named by the caller, not only configured: a refusal is an error
    for task in tasks:
        try:
            data = task_data(catalog, task, bags)
        except SurvivalRefused as exc:
            if asked:
                raise
            log.warning("%s heads skipped: %s", task, exc)
            report.refused[task] = str(exc)
            continue
        results, registered = {}, {}
        for aggregator in aggregators:
            if aggregator not in TASKS[task].aggregators:
                continue  # e.g. max-instance MIL has no fold-change form, the tumour task no tumour guide
            if aggregator == GUIDED and guides is None:
                log.warning("%s/%s skipped: no tumour head to guide it (%s)", task, GUIDED, no_guide)
                continue
            fingerprint = _fingerprint(view, state, label_version, cfg, (task,), (aggregator,))
            result, run_id, mask, reused = _cv_run(
                context, fingerprint, force, data, aggregator,
                lambda a=aggregator: cross_validate(data, bags, a, hcfg, strict, guides), bags, masks)
            _record(report, result, run_id, mask, reused)
            results[aggregator] = result
            if hcfg.register_models:
                registered[aggregator] = register_final(tracker, data, bags, aggregator, hcfg, view, labels, tag,
                                                        run_id, result.score, guides)
                report.versions[f"{task}/{aggregator}"] = registered[aggregator].version
            elif reused and tracker.client.get_run(run_id).info.status != "FINISHED":
                tracker.end_run(run_id)  # its cross-validation was complete: adopted as it is
        if not results:
            continue
        fingerprint = _fingerprint(view, state, label_version, cfg, (task,), tuple(results) + (BEST,))
        best, run_id, _, reused = _cv_run(context, fingerprint, force, data, BEST,
                                          lambda: select_per_fold(list(results.values()), hcfg, strict), bags, masks)
        _record(report, best, run_id, None, reused)
        if reused and tracker.client.get_run(run_id).info.status != "FINISHED":
            tracker.end_run(run_id)
        if hcfg.register_models:
            report.best[task] = choose({a: vars(r) for a, r in registered.items()}, list(registered))
            report.versions[f"{task}/{BEST}"] = registered[report.best[task]].version
            report.promotions[task] = _set_aliases(tracker, task, registered, results, report.best[task], best.score,
                                                   label_version, ablation, hcfg.promote)
            if not ablation:  # the ablation's versions are compared in MLflow, not shown as the cohort's predictions
                store_cv_predictions(catalog, tracker, results, {a: r.version for a, r in registered.items()},
                                     view.view_id, task)
    if hcfg.register_models and not ablation and report.best:
        report.patients = _patient_level(catalog, tracker, report, cfg.predict.patient_pooling, hcfg)
    return report


def _patient_level(catalog: Catalog, tracker: Tracker, report: HeadsReport, pooling: str, hcfg) -> dict:
    """The patients' out-of-fold rows pooled from their slides' (``patient_predictions``, source ``cv``) and their
    patient-level metrics, logged on each task's ``best`` run as ``patient_<metric>``."""
    store_patient_predictions(catalog, CV, pooling, best_versions(tracker, MODEL_NAMES))
    scored = patient_cv_metrics(catalog, bootstrap=hcfg.bootstrap, seed=hcfg.seed)
    for task, values in scored.items():
        run_id = report.runs.get(f"{task}/{BEST}")
        if run_id is not None:
            tracker.log_metrics(run_id, {f"patient_{k}": v for k, v in values.items()})
        log.info("%s, patient level (%d patients, out of fold): AUC %.3f [%.3f, %.3f]", task, values["patients"],
                 values["auc"], values["auc_low"], values["auc_high"])
    return scored


def _tumour_guides(catalog: Catalog, bags: dict, cfg) -> tuple[TumourGuides | None, ValueError | None]:
    """The tumour heads that guide ``guided`` (each fitted on first use), or None and why there can be none
    (e.g. a cohort without normal slides)."""
    try:
        return TumourGuides(task_data(catalog, "tumor", bags), bags, cfg), None
    except ValueError as exc:
        return None, exc


def _cv_run(context, fingerprint: str, force: bool, data, aggregator: str, compute, bags, masks):
    """(result, run id, attention-vs-mask metrics, reused): an earlier run of this fingerprint read back, or
    ``compute()`` tracked as a new run. The mask metrics score the out-of-fold attention maps of the tumour task."""
    tracker, view, labels, tag, params, docs, cohorts, strict, hcfg = context
    prior = None if force else prior_run(tracker, fingerprint)
    if prior is not None:
        result, mask = read_back(tracker, prior, data, aggregator)
        log.info("%s/%s: inputs unchanged, reusing MLflow run %s", data.name, aggregator, prior.info.run_id)
        return result, prior.info.run_id, mask, True
    result = compute()
    mask = mask_metrics(result.attention, bags, masks, Smoothing.of(hcfg), hcfg.tumour_fraction_bins) \
        if data.name == "tumor" and result.attention else {}
    run_id = track_cv(tracker, result, view, labels, tag, params, docs, mask, fingerprint, cohorts, strict)
    if result.patients is not None and len(result.patients):
        _log_survival(tracker, run_id, result)
    return result, run_id, mask, False


def _log_survival(tracker: Tracker, run_id: str, result: CVResult) -> None:
    """The survival run's per-patient out-of-fold risks and the Kaplan-Meier picture of its high vs low groups
    (split at each fold's training median risk), with the log-rank p, as artifacts of the run."""
    import tempfile

    from histcode.viz.plots import kaplan_meier_png

    pooled = result.pooled
    note = (f"C-index {pooled.get('c_index', float('nan')):.3f} "
            f"[{pooled.get('c_index_ci_low', float('nan')):.3f}, {pooled.get('c_index_ci_high', float('nan')):.3f}]\n"
            f"log-rank p = {pooled.get('logrank_p', float('nan')):.3g}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        result.patients.to_csv(out / "survival_patients.csv", index=False)
        km_table(result.patients).to_csv(out / "kaplan_meier.csv", index=False)
        kaplan_meier_png(km_curves(result.patients), f"survival / {result.aggregator}: out-of-fold risk groups",
                         out / KM_PICTURE, note)
        tracker.log_artifacts(run_id, out)


def _record(report: HeadsReport, result: CVResult, run_id: str, mask: dict[str, float], reused: bool) -> None:
    key = f"{result.task.name}/{result.aggregator}"
    if result.task.name == "tumor" and mask:
        report.mask_auc[result.aggregator] = mask
    report.results.append(result)
    report.runs[key] = run_id
    if reused:
        report.reused.append(key)


def _set_aliases(tracker: Tracker, task: str, registered: dict, results: dict[str, CVResult], chosen: str,
                 best_score: float, label_version: str, ablation: str | None, force: bool) -> list[Promotion]:
    """Production: each aggregator's alias and ``best`` move only to better versions (``promote``). Ablation:
    ``ablation-<method>-<aggregator>`` and ``ablation-<method>-best`` point at this run's versions."""
    if ablation:
        out = []
        for alias, version in [(a, r.version) for a, r in registered.items()] + [(BEST, registered[chosen].version)]:
            set_alias(tracker, task, f"ablation-{ablation}-{alias}", version)
            out.append(Promotion(f"ablation-{ablation}-{alias}", version, True, "ablation"))
        return out
    out = [promote(tracker, task, a, r.version, results[a].score, label_version, "cv_score", force)
           for a, r in registered.items()]
    out.append(promote(tracker, task, BEST, registered[chosen].version, best_score, label_version, "selection_score",
                       force))
    return out
