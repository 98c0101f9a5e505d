"""Patient-level cross-validation of one head on one task.

Outer folds are the label gate's plan (patients never straddle folds). Inside each training fold, whole patients
are held out twice, apart: a split the torch heads stop early on (``heads.val_fraction``) and a split no head fits
or stops on, which alone scores the heads to choose among aggregators (``heads.selection_fraction``,
``histcode.heads.select``), so that an aggregator that stopped on its split does not win the choice by it; the
test fold is only ever predicted, never used for a choice, and its slides' labels come from the training
folds' samples (``TaskKind.for_fold``). Test predictions of all folds are pooled for the metrics and their
patient-level bootstrap intervals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
from torch import nn

from histcode.config import HeadsConfig
from histcode.heads.data import Bag, inner_splits
from histcode.heads.fit import GUIDED, FittedHead, fit_head

LINEAR = ("mean", GUIDED)  # heads fitted in closed form by scikit-learn: nothing to stop early
from histcode.heads.tasks import TaskData


class Guide(Protocol):
    """A fitted head whose attention pools the bags of another task, with the patients it was fitted on."""

    model: nn.Module
    patients: Collection[str]


Guides = Callable[[int | None], Guide]

log = logging.getLogger(__name__)


@dataclass
class CVResult:
    task: TaskData  # as tested: each slide's targets from its own test fold (TaskKind.tested)
    aggregator: str  # or "best": the per-fold choice among aggregators (histcode.heads.select)
    fold_metrics: list[dict] = field(default_factory=list)
    fold_slides: list[dict[str, list[str]]] = field(default_factory=list)  # train / stop / select / test ids per fold
    pooled: dict = field(default_factory=dict)
    predictions: pd.DataFrame | None = None
    attention: dict[str, np.ndarray] = field(default_factory=dict)  # test-fold attention of each slide
    genes: list[dict] | None = None
    strict: dict = field(default_factory=dict)  # pooled over the folds the encoder never saw (see strict_folds)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # out-of-fold output of each tested slide
    patients: pd.DataFrame | None = None  # survival: one row per patient (risk, time, event, high/low group)

    @property
    def score(self) -> float:
        """The number the best model is chosen by: pooled AUC, the mean per-gene AUC for DE, the C-index for
        survival."""
        return self.task.kind.selection_score(self.pooled)


@dataclass
class InnerFit:
    """A head fitted inside a training fold, with the slides (indices of the task) of each inner split."""

    head: FittedHead
    fit: np.ndarray  # the head was fitted on these ...
    stop: np.ndarray  # ... early-stopped on these (torch heads; the linear heads fit on fit + stop) ...
    select: np.ndarray  # ... and is scored on these alone, to be chosen among aggregators

    @property
    def seen(self) -> np.ndarray:
        """Every slide the fitting read (fit and stop)."""
        return np.concatenate([self.fit, self.stop])


def _split_or_none(task: TaskData, idx: np.ndarray, strata: np.ndarray, mask_rest: np.ndarray, what: str) -> bool:
    """Whether a held-out split can be made and still leave slides (of every class, for class tasks) to fit on."""
    if not mask_rest.any() or (task.kind.needs_every_class and len(np.unique(strata[mask_rest])) < 2):
        log.warning("%s: too few patients for a %s split that leaves %s to fit on; none is made", task.name, what,
                    "every class" if task.kind.needs_every_class else "any slide")
        return False
    return True


def fit_on(task: TaskData, bags: dict[str, Bag], idx: np.ndarray, aggregator: str, cfg: HeadsConfig,
           seed: int, guide: Guide | None = None) -> InnerFit:
    """Fit on the slides ``idx`` with two inner patient splits, one to stop on and one to choose by. The splits
    depend only on the slides, their strata and the seed, so every aggregator of a fold sees the same ones. Torch
    heads fit on ``fit`` and stop early on ``stop``; the linear heads, which do not stop early, fit on both; no
    head fits or stops on ``select``. ``guide``: the guide fitted on the same training patients (the ``guided``
    aggregator's pooling)."""
    kind = task.kind
    strata = kind.strata(task, idx)
    if kind.needs_every_class and len(np.unique(strata)) < 2:
        raise ValueError(f"{task.name}: the training slides hold a single class ({task.classes[int(strata[0])]}); "
                         "too few patients per class for this many folds")
    fit, stop, select = inner_splits(task.patients[idx], strata, cfg.val_fraction, cfg.selection_fraction, seed)
    if not _split_or_none(task, idx, strata, fit | stop, "selection"):
        fit, stop, select = fit | select, stop, np.zeros(len(idx), dtype=bool)
    if not _split_or_none(task, idx, strata, fit, "early-stopping"):
        fit, stop = fit | stop, np.zeros(len(idx), dtype=bool)  # trained for the configured epochs
    if aggregator in LINEAR:
        fit, stop = fit | stop, np.zeros(len(idx), dtype=bool)
    feats = [bags[task.slide_ids[i]].features for i in range(len(task.slide_ids))]
    pairs = lambda ids: list(zip([feats[i] for i in ids], kind.targets(task, ids)))  # noqa: E731
    if guide is not None:  # the guide must not have seen a patient this fit holds out (a test fold)
        held = set(guide.patients) & (set(task.patients) - set(task.patients[idx]))
        if held:
            raise RuntimeError(f"{task.name}: the guide was fitted on patients {sorted(held)[:5]} this fit must not see")
    head = fit_head(kind, aggregator, pairs(idx[fit]), pairs(idx[stop]), task.shape, cfg, seed,
                    guide.model if guide is not None else None)
    return InnerFit(head, idx[fit], idx[stop], idx[select])


def validation(task: TaskData, bags: dict[str, Bag], head: FittedHead, val_idx: np.ndarray) -> dict[str, float]:
    """The head's selection score and comparable loss on its selection slides (NaN without any)."""
    outputs: list = [None] * len(task.slide_ids)
    for i in val_idx:
        outputs[i] = head.predict(bags[task.slide_ids[i]].features)[0]
    if len(val_idx) == 0:
        return {"val_score": float("nan"), "val_loss": float("nan")}
    return {"val_score": task.kind.selection_score(task.kind.score(task, val_idx, outputs)),
            "val_loss": task.kind.val_loss(task, val_idx, outputs)}


def cross_validate(task: TaskData, bags: dict[str, Bag], aggregator: str, cfg: HeadsConfig,
                   strict_folds: frozenset[int] = frozenset(), guides: Guides | None = None) -> CVResult:
    """``strict_folds``: folds whose patients the encoder was not pretrained on (pretrain.exclude_test_folds);
    their pooled test metrics are kept apart in ``result.strict``. ``guides``: outer fold (None: every slide) ->
    the guide fitted on that fold's training patients (``histcode.heads.guided``), for ``guided``."""
    kind = task.kind
    tested = kind.tested(task)
    result = CVResult(tested, aggregator)
    n = len(task.slide_ids)
    outputs: list[np.ndarray | None] = [None] * n
    for k in range(task.n_folds):
        test_idx = np.flatnonzero(task.folds == k)
        rest = np.flatnonzero(task.folds != k)
        if len(test_idx) == 0 or len(rest) == 0:
            continue
        fold_task = kind.for_fold(task, k)
        guide = guides(k) if guides is not None and aggregator == GUIDED else None
        inner = fit_on(fold_task, bags, rest, aggregator, cfg, cfg.seed + k, guide)
        head = inner.head
        shared = set(task.patients[test_idx]) & set(task.patients[np.concatenate([inner.seen, inner.select])])
        if shared:
            raise RuntimeError(f"fold {k}: patients {sorted(shared)} are in both the test fold and training")
        for i in test_idx:
            out, att = head.predict(bags[task.slide_ids[i]].features)
            outputs[i] = out
            result.attention[task.slide_ids[i]] = att
        ids = lambda idx: [task.slide_ids[i] for i in idx]  # noqa: E731
        result.fold_slides.append({"train": ids(inner.fit), "stop": ids(inner.stop), "select": ids(inner.select),
                                   "test": ids(test_idx)})
        fold = {"fold": k, "epochs": head.epochs, "n_test": len(test_idx),
                **validation(fold_task, bags, head, inner.select)}
        fold.update(kind.score(tested, test_idx, outputs))
        result.fold_metrics.append(fold)
        log.info("%s/%s fold %d: %s", task.name, aggregator, k, {m: round(v, 3) for m, v in fold.items() if isinstance(v, float)})
    result.outputs = {task.slide_ids[i]: o for i, o in enumerate(outputs) if o is not None}
    return pool(result, cfg, strict_folds)


def pool(result: CVResult, cfg: HeadsConfig, strict_folds: frozenset[int] = frozenset()) -> CVResult:
    """Pooled metrics, intervals and tables of ``result.outputs`` (the out-of-fold outputs) against the tested
    targets; ``strict`` pooled over ``strict_folds`` only."""
    task = result.task
    outputs = [result.outputs.get(s) for s in task.slide_ids]
    done = np.array([o is not None for o in outputs])
    result.pooled = task.kind.score(task, np.flatnonzero(done), outputs)
    if done.any():
        task.kind.summarise(result, task, np.flatnonzero(done), outputs, cfg)
    strict = np.flatnonzero(done & np.isin(task.folds, sorted(strict_folds)))
    if len(strict):
        result.strict = task.kind.score(task, strict, outputs)
    return result
