"""Tumour heads as guides: the attention that pools the bags of the tasks read from the tumour.

LUAD vs LUSC and the driver genes' expression are properties of the tumour, but a slide's bag is mostly benign
lung: a mean of its tiles dilutes the tumour (a small focus of 2% of the tissue all but vanishes), and an
attention head trained on the tumour slides alone (18 bags on the demo) has too few bags to learn where the
tumour is. The tumour task has every slide, normal ones included, and its gated-attention head learns where the
tumour is (its attention against the ground-truth masks: AUC 0.9 on the demo). ``guided`` pools each bag by
that head's attention, sum_i a_i h_i, and fits the mean-pool heads' linear models on those vectors.

No test fold leaks in: for outer fold k the guide is a tumour head fitted on the slides of every other fold's
patients (the tumour task's own folds, planned per patient at labelling, so a patient's tumour and normal slides
are in one fold), with its own inner split for early stopping, exactly as the tumour task's cross-validation
fits fold k; the final guided head is guided by a tumour head fitted on every slide. ``fit_on`` refuses a guide
fitted on a patient it must not see.

One asymmetry, stated: the fold-k guide is fitted on the patients outside fold k less its own selection split,
and the subtype and DE tasks draw their selection splits from their own slides, so the guide may have seen (by
their tumour labels) some of the patients the subtype and DE fits hold out to choose by. Those scores, which
choose among aggregators per fold, are therefore somewhat optimistic for ``guided``; the outer test folds, which
every reported score (``best`` included) is pooled from, are untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from torch import nn

from histcode.config import HeadsConfig
from histcode.heads.cv import fit_on
from histcode.heads.data import Bag
from histcode.heads.tasks import TaskData

log = logging.getLogger(__name__)

GUIDE_AGGREGATOR = "attention"  # the tumour head kind that guides: CLAM_SB's gated attention


@dataclass(frozen=True)
class FittedGuide:
    model: nn.Module  # bag -> (outputs, attention)
    patients: frozenset[str]  # the patients whose slides it was fitted on (validation split included)


class TumourGuides:
    """Outer fold k -> the tumour head fitted on every other fold's slides (None: on every slide), each fitted
    once and kept (the subtype and DE tasks share them)."""

    def __init__(self, tumour: TaskData, bags: dict[str, Bag], cfg: HeadsConfig) -> None:
        if tumour.name != "tumor":
            raise ValueError(f"a guide is a tumour head; got the {tumour.name!r} task")
        present = sorted({tumour.classes[int(c)] for c in tumour.y})
        if len(present) < 2:
            raise ValueError(f"a tumour head needs tumour and normal slides; the labelled slides are "
                             f"{', '.join(present) or 'none'} only")
        self.tumour, self.bags, self.cfg = tumour, bags, cfg
        self._fitted: dict[int | None, FittedGuide] = {}

    def __call__(self, fold: int | None) -> FittedGuide:
        if fold not in self._fitted:
            task = self.tumour
            idx = np.arange(len(task.slide_ids)) if fold is None else np.flatnonzero(task.folds != fold)
            if len(idx) == 0:
                raise ValueError(f"no tumour-labelled slides outside fold {fold} to fit a guide on")
            # the seed of the tumour task's own fit of this fold: the guide is that fold's tumour head
            seed = self.cfg.seed + (0 if fold is None else fold)
            inner = fit_on(task, self.bags, idx, GUIDE_AGGREGATOR, self.cfg, seed)
            self._fitted[fold] = FittedGuide(inner.head.model, frozenset(task.patients[idx].tolist()))
            log.info("guide for %s: tumour head on %d slides of %d patients", "the final heads" if fold is None
                     else f"outer fold {fold}", len(idx), len(self._fitted[fold].patients))
        return self._fitted[fold]
