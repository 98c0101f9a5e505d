"""How well attention finds the tissue that carries the evidence, measured against ground-truth masks.

A slide whose manifest gave a ``mask`` (a label image: 0 glass, 1 benign, 2 tumour) and ``mask_mpp`` gets, per
tile, a tumour label (at least half the tile's area is tumour in the mask); the AUC of the tile attention
against those labels says whether the head looked at the tumour. The demo cohort has such masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from histcode.heads.data import Bag
from histcode.wsi.grid import tissue_fractions

TUMOUR_LABEL = 2


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


def attention_mask_auc(result, bags: dict[str, Bag], slides: dict[str, dict]) -> float:
    """Mean over the test-fold tumour slides with a mask (and both tumour and benign tiles) of the AUC of
    attention against the mask; NaN when no slide qualifies."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for sid, attention in result.attention.items():
        truth = tile_tumour_labels(slides.get(sid, {}), bags[sid]) if sid in slides else None
        if truth is None or truth.all() or not truth.any() or len(set(np.round(attention, 12))) < 2:
            continue
        aucs.append(roc_auc_score(truth, attention))
    return float(np.mean(aucs)) if aucs else float("nan")
