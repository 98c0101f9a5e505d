"""Bags of tile embeddings per slide, and the inner splits of a training fold (stopping, selection).

Bags are built slide by slide: the view's tile table is read a few whole slides at a time (through its
``slide_id`` index) and the vectors, tile corners and tile ids are appended to files that the bags then
memory-map, so building the training set holds one chunk in memory whatever the cohort's size; the operating
system pages the data in as training touches it. The files are unlinked as soon as they are mapped (nothing is
left behind).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from histcode.features.read import slide_chunks, slide_features, view_table
from histcode.features.registry import FeatureView
from histcode.store.vectors import TILE_KIND
from histcode.workspace import Workspace

CHUNK_ROWS = 20_000  # tiles read per chunk while building bags (40 MB of vectors at 512-d)


class TileIds(Sequence[str]):
    """A bag's tile ids, read on access from bytes and offsets kept in memory-mapped files (so the training set of
    a cohort holds no Python string per tile); compares equal to a list or tuple of the same ids."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self._data, self._offsets = data, offsets  # offsets: len + 1 positions into data

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"tile {i} of a bag of {n}")
        i %= n
        return self._data[self._offsets[i]:self._offsets[i + 1]].tobytes().decode()

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"TileIds({len(self)} tiles)"


@dataclass
class Bag:
    slide_id: str
    patient_id: str
    features: np.ndarray  # (n_tiles, dim) float32
    tile_ids: Sequence[str]
    xy: np.ndarray  # (n_tiles, 2) level-0 corners
    size: int

    @property
    def has_tiles(self) -> bool:
        """False for a slide-level view's one-vector bag (size 0: the vector covers the whole slide, no tile), whose
        attention and per-tile scores have nothing to be drawn on."""
        return self.size > 0


def load_bags(ws: Workspace, view: FeatureView, as_of: int | str | None = None,
              slide_ids: list[str] | None = None, chunk_rows: int = CHUNK_ROWS,
              spill_dir: Path | None = None) -> dict[str, Bag]:
    """The bags of ``slide_ids`` (default: every slide of the view), one per slide, tiles in (y, x) order. Their
    features, corners and tile ids are views of memory maps of files written chunk by chunk and unlinked at once
    (features copy-on-write: writes stay in memory, never reach the file), so what the training set holds in
    memory does not grow with the cohort; the operating system pages the data in as it is touched. The files go
    in ``spill_dir``, by default the workspace's data folder (a reader that writes nothing there, the viewer,
    passes a temporary folder).

    A slide-level view (a slide encoder's vectors, ``FeatureView.slide_level``) gives each slide a bag of ONE
    vector: its slide embedding, with the slide id as its one "tile" id, corner (0, 0) and size 0 (the vector
    covers the whole slide, no tile). Mean pooling over it is the vector itself, so the mean heads are linear
    probes on the slide embedding, as TITAN and PRISM report theirs; an attention head attends to its only
    instance (weight 1) and becomes a gated MLP on it. Attention maps and heatmaps of such a view have no tiles
    to show."""
    if view.slide_level:
        return slide_vector_bags(ws, view, as_of, slide_ids)
    table = view_table(ws, view, TILE_KIND, as_of)
    spill_dir = ws.data_dir if spill_dir is None else spill_dir
    spill_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[int, str]] = {}
    spans: list[tuple[str, str, int, int, int]] = []  # slide, patient, first and end tile, size
    total = id_bytes = 0
    try:
        out = {}
        for name in ("vectors", "xy", "ids", "offsets"):
            files[name] = tempfile.mkstemp(prefix=f"bags-{name}-", suffix=".bin", dir=spill_dir)
            out[name] = os.fdopen(files[name][0], "wb")
        with out["vectors"], out["xy"], out["ids"], out["offsets"]:
            for chunk in slide_chunks(table, slide_ids, chunk_rows):
                vectors = chunk.column("vector").combine_chunks()
                vectors.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).tofile(out["vectors"])
                xy = np.stack([chunk.column("x").to_numpy(), chunk.column("y").to_numpy()], axis=1)
                xy.astype(np.int64).tofile(out["xy"])
                ids = chunk.column("tile_id").combine_chunks().cast(pa.large_binary())
                offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset:ids.offset + len(ids) + 1]
                if offsets[-1] > offsets[0]:
                    out["ids"].write(memoryview(ids.buffers()[2])[offsets[0]:offsets[-1]])
                (offsets[:-1] - offsets[0] + id_bytes).tofile(out["offsets"])
                id_bytes += int(offsets[-1] - offsets[0])
                sids = chunk.column("slide_id").to_numpy(zero_copy_only=False)
                starts = np.flatnonzero(np.r_[True, sids[1:] != sids[:-1]])
                ends = np.r_[starts[1:], len(sids)]
                patients, sizes = chunk.column("patient_id"), chunk.column("size")
                for a, b in zip(starts.tolist(), ends.tolist()):
                    spans.append((str(sids[a]), patients[a].as_py(), total + a, total + b, int(sizes[a].as_py())))
                total += len(sids)
            np.array([id_bytes], dtype=np.int64).tofile(out["offsets"])
        if not total:
            return {}
        features = np.memmap(files["vectors"][1], dtype=np.float32, mode="c", shape=(total, view.dim))
        corners = np.memmap(files["xy"][1], dtype=np.int64, mode="r", shape=(total, 2))
        offsets = np.memmap(files["offsets"][1], dtype=np.int64, mode="r", shape=(total + 1,))
        data = np.memmap(files["ids"][1], dtype=np.uint8, mode="r") if id_bytes else np.zeros(0, np.uint8)
    finally:
        for name, (_, path) in files.items():
            if name in out and not out[name].closed:  # an error before the writes were closed
                out[name].close()
            os.unlink(path)  # the mappings keep the data; nothing is left on disk once the bags are dropped
    return {sid: Bag(sid, patient, features[a:b].view(np.ndarray), TileIds(data, offsets[a:b + 1]),
                     corners[a:b].view(np.ndarray), size)
            for sid, patient, a, b, size in spans}


def slide_vector_bags(ws: Workspace, view: FeatureView, as_of: int | str | None = None,
                      slide_ids: list[str] | None = None) -> dict[str, Bag]:
    """One-vector bags of a slide-level view, read from its slide table (see ``load_bags``)."""
    data = slide_features(ws, view, slide_ids=slide_ids, as_of=as_of)
    if data.num_rows == 0:
        return {}
    column = data.column("vector").combine_chunks()
    vectors = column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, view.dim)
    sids, patients = data.column("slide_id").to_pylist(), data.column("patient_id").to_pylist()
    return {sid: Bag(sid, patient, vectors[i:i + 1].copy(), [sid], np.zeros((1, 2), np.int64), 0)
            for i, (sid, patient) in sorted(enumerate(zip(sids, patients)), key=lambda item: item[1][0])}


def inner_split(patients: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (rest, held out) over a training fold: whole patients are held out, stratified by label
    where every class has enough patients; the test fold is never touched here."""
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


def inner_splits(patients: np.ndarray, y: np.ndarray, stop_fraction: float, select_fraction: float,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks (fit, stop, select) over a training fold, each of whole patients: ``select_fraction`` of the
    patients are held out to choose among aggregators (no head fits or stops on them), ``stop_fraction`` (of the
    fold) of the others for early stopping, the rest to fit on."""
    rest, select = inner_split(patients, y, select_fraction, seed)
    fit_rest, stop_rest = inner_split(patients[rest], y[rest], min(0.5, stop_fraction / (1 - select_fraction)),
                                      seed + 1)
    fit, stop = np.zeros(len(patients), bool), np.zeros(len(patients), bool)
    fit[np.flatnonzero(rest)[fit_rest]] = True
    stop[np.flatnonzero(rest)[stop_rest]] = True
    return fit, stop, select
