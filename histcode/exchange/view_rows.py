"""A view's tiles slide by slide, as the exports read them: only slides its ledger calls done (a slide whose
vectors were written by a run killed before its ledger row is not exported half-known), tiles in (y, x) order,
a few slides in memory at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from histcode.exchange.h5files import ExchangeError
from histcode.features.read import slide_chunks, tile_counts, view_table
from histcode.features.registry import FeatureView, done_slides
from histcode.store.catalog import Catalog
from histcode.store.vectors import TILE_KIND
from histcode.workspace import Workspace


@dataclass
class SlideTiles:
    slide: dict  # the catalog's slide row
    tile_ids: list[str]
    xy: np.ndarray  # (N, 2) int64 level-0 top-left corners
    size: int
    vectors: np.ndarray  # (N, D) float32

    @property
    def slide_id(self) -> str:
        return self.slide["slide_id"]


def view_spec(catalog: Catalog, view: FeatureView) -> dict:
    """The tiling spec the view's tiles were cut with (imported grids included)."""
    rows = catalog.query("SELECT spec_json FROM tiling_specs WHERE spec_id = ?", [view.spec_id])
    return json.loads(rows[0]["spec_json"]) if rows else {}


def exported_slides(ws: Workspace, view: FeatureView, slide_ids: list[str] | None = None) -> list[str]:
    """The view's done slides (optionally only ``slide_ids``; an unknown one is an ExchangeError)."""
    done = sorted(done_slides(Catalog.of(ws), view.view_id))
    if slide_ids is None:
        if not done:
            raise ExchangeError(f"view {view.view_id} has no materialised slide to export")
        return done
    missing = [s for s in slide_ids if s not in set(done)]
    if missing:
        raise ExchangeError(f"view {view.view_id} has no vectors for slide(s) {', '.join(map(repr, missing))}")
    return list(slide_ids)


def tile_total(ws: Workspace, view: FeatureView, slide_ids: list[str]) -> int:
    return sum(tile_counts(view_table(ws, view, TILE_KIND), slide_ids).values())


def _split(chunk: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    sids = chunk.column("slide_id").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, sids[1:] != sids[:-1]])
    for a, b in zip(starts, np.r_[starts[1:], len(sids)]):
        yield str(sids[a]), chunk.slice(int(a), int(b - a))


def slide_tiles(ws: Workspace, view: FeatureView, slide_ids: list[str]) -> Iterator[SlideTiles]:
    """Each of ``slide_ids`` with its tiles and vectors, in slide-id order."""
    catalog = Catalog.of(ws)
    table = view_table(ws, view, TILE_KIND)
    for chunk in slide_chunks(table, slide_ids):
        for sid, rows in _split(chunk):
            slide = catalog.get_slide(sid)
            if slide is None:
                raise ExchangeError(f"slide {sid!r} of view {view.view_id} is no longer in the catalog")
            vectors = rows.column("vector").combine_chunks()
            flat = vectors.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            sizes = set(rows.column("size").to_pylist())
            if len(sizes) != 1:
                raise ExchangeError(f"slide {sid!r} has tiles of {len(sizes)} sizes in view {view.view_id}")
            xy = np.stack([rows.column("x").to_numpy(), rows.column("y").to_numpy()], axis=1).astype(np.int64)
            yield SlideTiles(slide, rows.column("tile_id").to_pylist(), xy, int(sizes.pop()),
                             flat.reshape(-1, view.dim))
