"""Slide vectors for slide search and retrieval: the view's mean of tiles, or pooled by the tumour head's
attention.

A slide vector that averages every tile is dominated by the slide's commonest tissue, so a slide with a small
tumour focus looks like a normal one, and a tumour's subtype is diluted by the benign lung around it.
Attention pooling weighs each tile by the registered gated-attention tumour head's attention
(``histcode-tumor-head@attention``, trained on the same view), as CLAM pools a bag: the vector is the
attention-weighted mean of the slide's tile vectors, so it describes the tissue the head found informative.
The head must have been trained on the view searched (vectors of another encoder mean nothing to it).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from histcode.features.registry import FeatureView
from histcode.heads.apply import HeadNotFound, load_head
from histcode.heads.data import load_bags
from histcode.tracking import Tracker
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

Pooling = Literal["mean", "attention"]
POOLINGS: tuple[str, ...] = ("mean", "attention")
ATTENTION_HEAD = ("tumor", "attention")  # task, alias


class PoolingError(ValueError):
    """The pooling asked for cannot be made on this view; the message says what to run."""


def attention_weights(attention: np.ndarray) -> np.ndarray:
    """A head's per-tile attention as weights that sum to one (uniform where it gives none)."""
    w = np.clip(np.nan_to_num(np.asarray(attention, dtype=np.float64)), 0.0, None)
    total = w.sum()
    return w / total if total > 0 else np.full(len(w), 1.0 / max(len(w), 1))


def slide_vectors(ws: Workspace, view: FeatureView, pooling: Pooling, as_of: int | str | None = None,
                  progress: bool = False) -> dict[str, np.ndarray] | None:
    """``None`` for ``mean`` (the view's own slide table is that), else slide id -> attention-pooled vector."""
    if pooling == "mean":
        return None
    if pooling != "attention":
        raise PoolingError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    task, alias = ATTENTION_HEAD
    try:
        head = load_head(Tracker(ws), task, alias)
    except HeadNotFound as exc:
        raise PoolingError(f"attention pooling needs a gated-attention tumour head: {exc}") from exc
    if head.view_id != view.view_id:
        raise PoolingError(f"histcode-tumor-head@{alias} (version {head.version}) was trained on view {head.view_id}, "
                           f"not {view.view_id}: run `histcode heads --view {view.view_id}` first")
    bags = load_bags(ws, view, as_of)
    out = {}
    for sid, bag in tqdm(bags.items(), desc="attention pooling", unit="slide", disable=not progress):
        _, attention = head(bag.features)
        out[sid] = attention_weights(attention) @ bag.features.astype(np.float64)
    log.debug("attention-pooled %d slides of view %s with tumour head version %s", len(out), view.view_id, head.version)
    return out
