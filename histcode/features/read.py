"""Reading features back: tile and slide vectors of a view, by id, at a version or tag, as Arrow, pandas or
torch; and a training set that joins slide features to labels with patient-grouped folds."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from histcode.features.registry import FeatureView, ViewError, resolve_view
from histcode.store.catalog import Catalog
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, VectorStoreError, connect, key_filter, open_table
from histcode.tracking import Tracker
from histcode.workspace import Workspace

Format = Literal["arrow", "pandas", "torch"]


def view_table(ws: Workspace, view: FeatureView, kind: str, as_of: int | str | None = None):
    """The view's Lance table for ``kind``, checked out at a version number or tag when ``as_of`` is given. A
    slide-level view (a slide encoder's) has no tile table: asking for one is a ViewError naming the tile view it
    was computed from."""
    if kind == TILE_KIND and view.slide_level:
        raise ViewError(f"view {view.view_id} holds one vector per slide from slide encoder "
                        f"{view.model_name.removeprefix('slide:')} and no tile vectors; tiles are in the view it was "
                        f"computed from, {view.source_view_id} (pass --view {view.source_view_id})")
    table = open_table(connect(ws.lancedb_uri), view.table(kind), create=False)
    if as_of is not None:
        try:
            table.checkout(int(as_of) if str(as_of).isdigit() else as_of)
        except Exception as exc:  # noqa: BLE001 -- lance raises ValueError / OSError variants
            tags = ", ".join(table.tags.list()) or "none"
            raise VectorStoreError(f"{view.table(kind).name}: no version or tag {as_of!r} (tags: {tags})") from exc
    return table


def _select(table, column: str, ids: list[str] | None, columns: list[str] | None = None) -> pa.Table:
    """Rows whose ``column`` is one of ``ids`` (all rows for None), through the column's scalar index."""
    dataset = table.to_lance()
    if ids is None:
        return dataset.to_table(columns=columns)
    if not ids:
        return dataset.to_table(columns=columns, limit=0)
    return dataset.to_table(columns=columns, filter=key_filter(column, list(ids)))


def tile_counts(table, slide_ids: list[str] | None = None) -> dict[str, int]:
    """Tiles per slide of a tile table, streamed over its ``slide_id`` column (never the vectors)."""
    counts: dict[str, int] = {}
    scanner = table.to_lance().scanner(columns=["slide_id"],
                                       filter=key_filter("slide_id", slide_ids) if slide_ids else None)
    for batch in scanner.to_batches():
        for item in pc.value_counts(batch.column("slide_id")).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


def _slides_sorted(table, slide_ids: list[str]) -> pa.Table:
    return _select(table, "slide_id", slide_ids).sort_by([("slide_id", "ascending"), ("y", "ascending"),
                                                           ("x", "ascending")])


def slide_chunks(table, slide_ids: list[str] | None = None, max_rows: int = 20_000):
    """The tile rows of ``slide_ids`` (default: every slide), a few whole slides at a time (about ``max_rows``
    rows, at least one slide), each chunk sorted by (slide_id, y, x): memory bounded by the chunk, not the view."""
    counts = tile_counts(table, slide_ids)
    group: list[str] = []
    rows = 0
    for sid in sorted(counts):
        if group and rows + counts[sid] > max_rows:
            yield _slides_sorted(table, group)
            group, rows = [], 0
        group.append(sid)
        rows += counts[sid]
    if group:
        yield _slides_sorted(table, group)


def _convert(data: pa.Table, fmt: Format):
    if fmt == "arrow":
        return data
    if fmt == "pandas":
        return data.to_pandas()
    if fmt == "torch":
        import torch

        vectors = data.column("vector").combine_chunks()
        flat = vectors.values.to_numpy(zero_copy_only=False)
        dim = vectors.type.list_size
        meta = data.drop_columns(["vector"]).to_pandas()
        return torch.from_numpy(flat.reshape(-1, dim).copy()), meta
    raise ValueError(f"format must be arrow, pandas or torch, not {fmt!r}")


def _view(ws: Workspace, view: FeatureView | str | None) -> FeatureView:
    if isinstance(view, FeatureView):
        return view
    return resolve_view(Catalog.of(ws), Tracker(ws), ws.config(), view)


def tile_features(ws: Workspace, view: FeatureView | str | None = None, tile_ids: list[str] | None = None,
                  slide_ids: list[str] | None = None, as_of: int | str | None = None, fmt: Format = "arrow"):
    """Tile vectors (and tile_id, slide_id, patient_id, x, y, size, attributes). ``fmt='torch'`` gives
    (an (N, dim) float tensor, a pandas frame of the other columns)."""
    table = view_table(ws, _view(ws, view), TILE_KIND, as_of)
    data = _select(table, "tile_id", tile_ids) if slide_ids is None else _select(table, "slide_id", slide_ids)
    if tile_ids is not None and slide_ids is not None:
        data = data.filter(pc.is_in(data.column("tile_id"), pa.array(tile_ids, pa.string())))
    return _convert(data, fmt)


def slide_features(ws: Workspace, view: FeatureView | str | None = None, slide_ids: list[str] | None = None,
                   as_of: int | str | None = None, fmt: Format = "arrow"):
    """Slide vectors (mean-pooled tiles, or a slide encoder's for a slide-level view) with slide_id, patient_id,
    n_tiles and attributes."""
    return _convert(_select(view_table(ws, _view(ws, view), SLIDE_KIND, as_of), "slide_id", slide_ids), fmt)


def patient_folds(patients: pd.Series, labels: pd.Series, folds: int, seed: int) -> np.ndarray:
    """A fold per row such that all of a patient's rows share a fold, stratified by label where possible."""
    from sklearn.model_selection import StratifiedGroupKFold

    fold = np.full(len(patients), -1)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(patients)), labels.astype(str), patients)):
        fold[test] = k
    return fold


def training_set(ws: Workspace, labels: pd.DataFrame, label: str, view: FeatureView | str | None = None,
                 folds: int = 5, seed: int = 0, as_of: int | str | None = None) -> pd.DataFrame:
    """Slide features joined to ``labels`` (a frame with ``slide_id`` and the ``label`` column), with a
    ``fold`` column that never splits a patient. Slides without features or without a label are dropped."""
    if "slide_id" not in labels or label not in labels:
        raise ValueError(f"labels need columns 'slide_id' and {label!r}; got {list(labels.columns)}")
    feats = slide_features(ws, view, as_of=as_of, fmt="pandas")
    frame = feats.merge(labels[["slide_id", label]].dropna(), on="slide_id", how="inner")
    if frame.empty:
        raise ValueError("no slide has both features and a label")
    n_patients = frame.patient_id.nunique()
    if n_patients < folds:
        raise ValueError(f"{n_patients} patients cannot fill {folds} folds")
    frame["fold"] = patient_folds(frame.patient_id, frame[label], folds, seed)
    return frame
