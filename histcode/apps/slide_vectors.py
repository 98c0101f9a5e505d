"""Slide vectors for slide search and retrieval: the view's mean of tiles, or pooled by the tumour head's
attention.

A slide vector that averages every tile is dominated by the slide's commonest tissue, so a slide with a small
tumour focus looks like a normal one, and a tumour's subtype is diluted by the benign lung around it.
Attention pooling weighs each tile by the registered gated-attention tumour head's attention
(``histcode-tumor-head@attention``, trained on the same view), as CLAM pools a bag: the vector is the
attention-weighted mean of the slide's tile vectors, so it describes the tissue the head found informative.
The head must have been trained on the view searched (vectors of another encoder mean nothing to it).

Which attention: ``final``, the registered head's, fitted on every labelled slide, is what slide search uses (it
applies to any slide, new ones included). Scoring retrieval over the labelled slides with it would be in-sample:
the head was fitted on the very slides whose vectors are then judged by their labels. ``out_of_fold`` pools each
slide by the attention its cross-validation gave it, from the fold model that never saw its patient (kept by the
head's CV run, ``attention.npz``); ``histcode search --evaluate`` and the demo score retrieval with it, and a
slide the cross-validation did not test has no such vector and takes no part.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from histcode.errors import HistcodeError
from histcode.features.registry import FeatureView
from histcode.heads.apply import HeadNotFound, load_head
from histcode.apps.head_runs import out_of_fold_attention
from histcode.heads.data import load_bags
from histcode.heads.names import MODEL_NAMES
from histcode.tracking import Tracker
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

Pooling = Literal["mean", "attention"]
POOLINGS: tuple[str, ...] = ("mean", "attention")
ATTENTION_HEAD = ("tumor", "attention")  # task, alias
AttentionSource = Literal["final", "out_of_fold"]
SOURCES: tuple[str, ...] = ("final", "out_of_fold")


class PoolingError(HistcodeError, ValueError):
    """The pooling asked for cannot be made on this view; the message says what to run."""


def attention_weights(attention: np.ndarray) -> np.ndarray:
    """A head's per-tile attention as weights that sum to one (uniform where it gives none)."""
    w = np.clip(np.nan_to_num(np.asarray(attention, dtype=np.float64)), 0.0, None)
    total = w.sum()
    return w / total if total > 0 else np.full(len(w), 1.0 / max(len(w), 1))


def slide_vectors(ws: Workspace, view: FeatureView, pooling: Pooling, as_of: int | str | None = None,
                  progress: bool = False, source: AttentionSource = "final") -> dict[str, np.ndarray] | None:
    """``None`` for ``mean`` (the view's own slide table is that), else slide id -> attention-pooled vector, the
    attention from ``source`` (see the module's docstring)."""
    if pooling == "mean":
        return None
    if pooling != "attention":
        raise PoolingError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if source not in SOURCES:
        raise PoolingError(f"attention source must be one of {', '.join(SOURCES)}, not {source!r}")
    task, alias = ATTENTION_HEAD
    tracker = Tracker(ws)
    try:
        head = load_head(tracker, task, alias)
    except HeadNotFound as exc:
        raise PoolingError(f"attention pooling needs a gated-attention tumour head: {exc}") from exc
    if head.view_id != view.view_id:
        raise PoolingError(f"histcode-tumor-head@{alias} (version {head.version}) was trained on view {head.view_id}, "
                           f"not {view.view_id}: run `histcode heads --view {view.view_id}` first")
    held_out = _out_of_fold(tracker, head) if source == "out_of_fold" else None
    bags = load_bags(ws, view, as_of, slide_ids=sorted(held_out) if held_out is not None else None)
    out = {}
    for sid, bag in tqdm(bags.items(), desc="attention pooling", unit="slide", disable=not progress):
        attention = held_out[sid] if held_out is not None else head(bag.features)[1]
        if len(attention) != len(bag.features):
            raise PoolingError(f"{sid}: the cross-validation's attention covers {len(attention)} tiles, the view holds "
                               f"{len(bag.features)}; the slide changed since `histcode heads`: train the heads again")
        out[sid] = attention_weights(attention) @ bag.features.astype(np.float64)
    log.debug("attention-pooled %d slides of view %s with tumour head version %s (%s)", len(out), view.view_id,
              head.version, source)
    return out


def _out_of_fold(tracker: Tracker, head) -> dict[str, np.ndarray]:
    """The out-of-fold attention kept by the cross-validation run that registered ``head``."""
    run_id = tracker.client.get_model_version(MODEL_NAMES[head.task], head.version).run_id
    attention = out_of_fold_attention(tracker, run_id)
    if not attention:
        raise PoolingError(f"histcode-tumor-head version {head.version} (run {run_id}) kept no out-of-fold attention: "
                           "it was trained before the heads' runs kept it; run `histcode heads --force`")
    return attention
