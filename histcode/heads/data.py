"""Bags of tile embeddings per slide, and inner validation splits of a training fold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histcode.features.read import tile_features
from histcode.features.registry import FeatureView
from histcode.workspace import Workspace


@dataclass
class Bag:
    slide_id: str
    patient_id: str
    features: np.ndarray  # (n_tiles, dim) float32
    tile_ids: list[str]
    xy: np.ndarray  # (n_tiles, 2) level-0 corners
    size: int


def load_bags(ws: Workspace, view: FeatureView, as_of: int | str | None = None,
              slide_ids: list[str] | None = None) -> dict[str, Bag]:
    """The bags of ``slide_ids`` (default: every slide of the view), one per slide, tiles in (y, x) order."""
    frame = tile_features(ws, view, slide_ids=slide_ids, as_of=as_of, fmt="pandas")
    bags = {}
    for sid, g in frame.groupby("slide_id", sort=True):
        g = g.sort_values(["y", "x"])
        bags[sid] = Bag(sid, g.patient_id.iloc[0], np.stack(g.vector.to_numpy()).astype(np.float32), g.tile_id.tolist(),
                        g[["x", "y"]].to_numpy(), int(g["size"].iloc[0]))
    return bags


def inner_split(patients: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, validation) over a training fold: whole patients go to validation, stratified by
    label where every class has enough patients; the test fold is never touched here."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, int(round(1 / fraction)))
    strata = y if y.ndim == 1 else np.zeros(len(y), dtype=int)
    try:
        splitter = StratifiedGroupKFold(n_splits=min(n_splits, len(np.unique(patients))), shuffle=True, random_state=seed)
        _, val = next(splitter.split(np.zeros(len(patients)), strata, patients))
    except ValueError:
        rng = np.random.default_rng(seed)
        chosen = rng.choice(np.unique(patients), max(1, int(len(np.unique(patients)) * fraction)), replace=False)
        val = np.flatnonzero(np.isin(patients, chosen))
    mask = np.zeros(len(patients), dtype=bool)
    mask[val] = True
    return ~mask, mask
