"""The cross-validation's out-of-fold predictions into the catalog's ``predictions`` table (source ``cv``): for each
version `histcode heads` registers, every training slide as predicted by the fold model that never saw its
patient (the numbers the version's reported scores are computed from), so that SQL and the viewer show a training
slide's honest prediction without applying a head that was fitted on it."""

from __future__ import annotations

import logging

import pandas as pd

from histcode.heads.cv import CVResult
from histcode.heads.names import MODEL_NAMES
from histcode.heads.outputs import class_outputs, de_outputs, survival_outputs
from histcode.store.catalog import Catalog
from histcode.store.predictions import CV, write_predictions
from histcode.tracking import Tracker

log = logging.getLogger(__name__)


def cv_rows(result: CVResult, version: str | int, view_id: str) -> pd.DataFrame:
    """``result``'s out-of-fold outputs as ``predictions`` rows of ``version`` (empty for a run that kept none)."""
    task = result.task
    folds = {sid: int(m["fold"]) for m, slides in zip(result.fold_metrics, result.fold_slides)
             for sid in slides.get("test", [])}
    rows = []
    for sid, out in sorted(result.outputs.items()):
        if task.name == "de":
            classified = [g for g, keep in zip(task.genes, task.gene_included) if keep] \
                if task.gene_included is not None else list(task.genes)
            outputs = de_outputs(task.genes, task.classes, classified, out)
        elif task.name == "survival":
            outputs = survival_outputs(out)
        else:
            outputs = class_outputs(task.name, task.classes, out)
        rows += [{"slide_id": sid, "task": task.name, "model": MODEL_NAMES[task.name], "version": int(version),
                  "aggregator": result.aggregator, "view_id": view_id, "source": CV, "fold": folds.get(sid),
                  "output": o.name, "value": o.value, "call": o.call} for o in outputs]
    return pd.DataFrame(rows)


def best_versions(tracker: Tracker, tasks) -> dict[str, int]:
    """task -> the version its ``@best`` names now (tasks without one left out)."""
    out = {}
    for task in tasks:
        try:
            out[task] = int(tracker.client.get_model_version_by_alias(MODEL_NAMES[task], "best").version)
        except Exception:  # noqa: BLE001 -- MLflow's own exception for a missing alias
            continue
    return out


def store_cv_predictions(catalog: Catalog, tracker: Tracker, results: dict[str, CVResult], versions: dict[str, str],
                         view_id: str, task: str) -> int:
    """Write each registered aggregator's out-of-fold rows (``versions``: aggregator -> version) and mark the
    task's other versions stale against its ``@best``."""
    frames = [cv_rows(results[a], v, view_id) for a, v in versions.items() if a in results]
    frame = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else pd.DataFrame()
    written = write_predictions(catalog, frame, best_versions(tracker, [task]))
    log.info("%s: %d out-of-fold prediction rows stored for versions %s", task, written,
             ", ".join(sorted(set(versions.values()), key=int)))
    return written
