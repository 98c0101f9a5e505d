"""How well attention finds the tissue that carries the evidence, measured against ground-truth masks.

A slide whose manifest gave a ``mask`` (a label image: 0 glass, 1 benign, 2 tumour) and ``mask_mpp`` gets, per
tile, a tumour label (at least half the tile's area is tumour in the mask); the AUC of the tile attention
against those labels says whether the head looked at the tumour. The demo cohort has such masks. The map
measured is the one every picture shows: the attention smoothed over the tile grid (``heads.attention_smoothing``,
``histcode.heads.smoothing``); the raw attention's AUC is reported beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from histcode.heads.data import Bag
from histcode.heads.smoothing import Smoothing
from histcode.wsi.grid import tissue_fractions

TUMOUR_LABEL = 2
MASK_AUC = "attention_mask_auc"  # metric names: this, _raw, _tf_<lo>_<hi> (see mask_metrics)


def tile_tumour_labels(slide: dict, bag: Bag) -> np.ndarray | None:
    """Per tile of ``bag``: True where the ground-truth mask is tumour on >= half the tile; None without a mask."""
    attrs = json.loads(slide["attributes"]) if slide.get("attributes") else {}
    path, mask_mpp = attrs.get("mask"), attrs.get("mask_mpp")
    if not path or not mask_mpp or not Path(path).is_file():
        return None
    from PIL import Image

    labels = np.asarray(Image.open(path)) == TUMOUR_LABEL
    ds = float(mask_mpp) / float(slide["mpp_x"])
    return tissue_fractions(labels, ds, np.asarray(bag.xy), bag.size) >= 0.5


def slide_mask_auc(slide: dict, bag: Bag, attention: np.ndarray, smoothing: Smoothing) -> float | None:
    """AUC of one slide's attention map (smoothed over the grid by ``smoothing``, ``histcode.heads.smoothing``)
    against its mask's tumour tiles; None without a mask, without both tumour and benign tiles, or for a flat map."""
    from sklearn.metrics import roc_auc_score

    truth = tile_tumour_labels(slide, bag)
    if truth is None or truth.all() or not truth.any():
        return None
    scores = smoothing.apply(attention, bag.xy, bag.size)
    if len(set(np.round(scores, 12))) < 2:
        return None
    return float(roc_auc_score(truth, scores))


def mask_metrics(attention: dict[str, np.ndarray], bags: dict[str, Bag], slides: dict[str, dict], smoothing: Smoothing,
                 bins: tuple[float, ...]) -> dict[str, float]:
    """Means over the slides with a mask of the AUC of attention against it (out of fold, for the CV): the map as
    drawn (``attention_mask_auc``, smoothed by ``smoothing``), the raw attention (``attention_mask_auc_raw``),
    and the drawn map per tumour-fraction bin (``attention_mask_auc_tf_<lo>_<hi>``, percent, with the bin's
    slide count ``n_mask_tf_<lo>_<hi>``) from the slide attribute ``tumour_fraction``. {} when no slide qualifies."""
    drawn, raw, fraction = {}, {}, {}
    for sid, a in attention.items():
        if sid not in slides or sid not in bags:
            continue
        auc = slide_mask_auc(slides[sid], bags[sid], a, smoothing)
        if auc is None:
            continue
        drawn[sid], raw[sid] = auc, slide_mask_auc(slides[sid], bags[sid], a, Smoothing())
        attrs = json.loads(slides[sid]["attributes"]) if slides[sid].get("attributes") else {}
        try:
            fraction[sid] = float(attrs.get("tumour_fraction", "nan"))
        except (TypeError, ValueError):
            fraction[sid] = float("nan")
    if not drawn:
        return {}
    out = {MASK_AUC: float(np.mean(list(drawn.values()))),
           f"{MASK_AUC}_raw": float(np.mean([v for v in raw.values() if v is not None]))}
    edges = [0.0, *bins, 1.0]
    for lo, hi in zip(edges[:-1], edges[1:]):
        name = f"tf_{round(lo * 100):02d}_{round(hi * 100):02d}"
        inside = [v for s, v in drawn.items() if lo <= fraction[s] < hi or (hi >= 1.0 and fraction[s] >= 1.0)]
        out[f"n_mask_{name}"] = float(len(inside))
        if inside:
            out[f"{MASK_AUC}_{name}"] = float(np.mean(inside))
    return out
