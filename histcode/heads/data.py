"""Bags of tile embeddings per slide, and inner validation splits of a training fold.

Bags are built slide by slide: the view's tile table is read a few whole slides at a time (through its
``slide_id`` index) and the vectors are appended to one float32 file that the bags then memory-map, so building
the training set holds one chunk of vectors in memory whatever the cohort's size; the operating system pages
the vectors in as training touches them. The file is unlinked as soon as it is mapped (nothing is left behind).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from histcode.features.read import slide_chunks, view_table
from histcode.features.registry import FeatureView
from histcode.store.vectors import TILE_KIND
from histcode.workspace import Workspace

CHUNK_ROWS = 20_000  # tiles read per chunk while building bags (40 MB of vectors at 512-d)


@dataclass
class Bag:
    slide_id: str
    patient_id: str
    features: np.ndarray  # (n_tiles, dim) float32
    tile_ids: list[str]
    xy: np.ndarray  # (n_tiles, 2) level-0 corners
    size: int


def load_bags(ws: Workspace, view: FeatureView, as_of: int | str | None = None,
              slide_ids: list[str] | None = None, chunk_rows: int = CHUNK_ROWS) -> dict[str, Bag]:
    """The bags of ``slide_ids`` (default: every slide of the view), one per slide, tiles in (y, x) order; their
    features are views of one copy-on-write memory map (writes stay in memory, never reach the file)."""
    table = view_table(ws, view, TILE_KIND, as_of)
    ws.data_dir.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="bags-", suffix=".f32", dir=ws.data_dir)
    spans: list[tuple[str, str, int, int, list[str], np.ndarray, int]] = []
    total = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in slide_chunks(table, slide_ids, chunk_rows):
                vectors = chunk.column("vector").combine_chunks()
                flat = vectors.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                flat.tofile(out)  # no extra copy
                sids = chunk.column("slide_id").to_numpy(zero_copy_only=False)
                starts = np.flatnonzero(np.r_[True, sids[1:] != sids[:-1]])
                ends = np.r_[starts[1:], len(sids)]
                meta = chunk.select(["tile_id", "patient_id", "x", "y", "size"])
                for a, b in zip(starts.tolist(), ends.tolist()):
                    part = meta.slice(a, b - a)
                    xy = np.stack([part.column("x").to_numpy(), part.column("y").to_numpy()], axis=1)
                    spans.append((str(sids[a]), part.column("patient_id")[0].as_py(), total + a, total + b,
                                  part.column("tile_id").to_pylist(), xy, int(part.column("size")[0].as_py())))
                total += len(sids)
        if not total:
            return {}
        features = np.memmap(path, dtype=np.float32, mode="c", shape=(total, view.dim))
    finally:
        os.unlink(path)  # the mapping keeps the data; nothing is left on disk once the bags are dropped
    return {sid: Bag(sid, patient, features[a:b].view(np.ndarray), tile_ids, xy, size)
            for sid, patient, a, b, tile_ids, xy, size in spans}


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
