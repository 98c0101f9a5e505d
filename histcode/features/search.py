"""Similarity search over a feature view: slides like a slide, tiles like a tile or like an image.

Cosine distance. ``where`` is a SQL filter on the table's columns (slide_id, patient_id, the promoted slide
attributes such as subtype, and x, y for tiles); the hits are the nearest rows that match it. The query slide
or tile itself is never returned.

Slides (pooled tile vectors, or a slide encoder's vectors in a slide-level view, searched the same way): by
default the view's mean slide vector is subtracted from the query and the candidates before cosine
distance (``centring="mean"``; see ``histcode.features.retrieval`` for why), and the search is exact, in numpy,
over the whole slide table read at query time (one row per slide: 10,000 slides of 1024-d are 40 MB read and
a 10-million-multiply product per query). Lance's vector search (and its ANN index, built on the raw vectors)
cannot rank by centred cosine, so slide search does not use it; ``centring="none"`` ranks by raw cosine on the
same exact path. Tiles: Lance's search on raw vectors, exact (flat) while a table has no index; with an IVF
index, ``nprobes`` partitions are searched and ``refine_factor`` x k candidates are re-ranked exactly. A
filtered tile search takes one of three paths by how many rows the filter keeps (counted through the scalar
indices ``features.upkeep`` builds with the vector index; see ``TileSearcher.strategy``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from histcode.config import FeaturesConfig
from histcode.errors import HistcodeError
from histcode.features.read import view_table
from histcode.features.registry import FeatureView, committed_version
from histcode.features.retrieval import (
    Centring,
    centre_of,
    cosine_distances,
    ranked,
    replace_vectors,
)
from histcode.features.upkeep import vector_index_type
from histcode.store.catalog import Catalog
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, quote_literal
from histcode.tracking import Tracker
from histcode.workspace import Workspace


class SearchError(HistcodeError, ValueError):
    """A query that cannot run: unknown id, unreadable image, bad filter."""


class FilterError(SearchError):
    """A ``where`` filter or a column list that a feature view's table cannot answer; the message names the
    table, the filter and the columns it has."""


@contextmanager
def filter_errors(table: str, where: str | None, columns: list[str]) -> Iterator[None]:
    """A failed Lance read with filter ``where`` told as what it is: a service outage (named as such), a bad
    filter (with the table's columns rather than Lance's internals: hidden columns, source paths), or, with no
    filter, the error as it is."""
    from histcode.errors import service_error_of

    try:
        yield
    except Exception as exc:  # noqa: BLE001 -- lance reports filter errors as several exception types
        outage = service_error_of(exc)
        if outage is not None:
            raise outage from exc
        if not where:
            raise
        text = str(exc).strip()
        first = text.split(". Valid fields")[0].split(", /")[0].splitlines()[0] if text else type(exc).__name__
        raise FilterError(f"cannot filter {table} by {where!r}: {first} (columns: {', '.join(columns)})") from exc


def _vector_of(table, column: str, key: str, view: FeatureView) -> np.ndarray:
    rows = table.to_lance().to_table(columns=["vector"], filter=f"{column} = {quote_literal(key)}")  # its id index
    if rows.num_rows == 0:
        raise SearchError(f"{column} {key!r} has no vector in view {view.view_id} (not embedded yet? run `histcode embed`)")
    return np.asarray(rows.column("vector")[0].as_py(), dtype=np.float32)


def embed_image(ws: Workspace, view: FeatureView, image) -> np.ndarray:
    """The view's encoder applied to an image (a file, an RGB array or a PIL image; the whole image, resized to
    the view's input size)."""
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(image, np.ndarray):
            im = Image.fromarray(np.ascontiguousarray(image))  # uint8 (H, W, 3); other dtypes: TypeError
        elif isinstance(image, Image.Image):
            im = image
        else:
            with Image.open(Path(image)) as opened:
                im = opened.convert("RGB")
        pixels = np.asarray(im.convert("RGB").resize((view.image_px, view.image_px), Image.Resampling.BOX))
    except (FileNotFoundError, UnidentifiedImageError, OSError, TypeError, ValueError) as exc:
        what = image if isinstance(image, (str, Path)) else f"a {type(image).__name__}"
        raise SearchError(f"cannot read query image {what}: {exc}") from exc
    model = Tracker(ws).load_model(view.encoder_uri)
    # as it is: a stain estimated from one homogeneous tile is unreliable (see histcode.ssl.stain_norm)
    x = torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None].float() / 255.0
    with torch.inference_mode():
        return model(x).float().numpy()[0]


def search(ws: Workspace, view: FeatureView, cfg: FeaturesConfig, *, slide_id: str | None = None,
           tile_id: str | None = None, image: Path | None = None, k: int = 10, where: str | None = None,
           as_of: int | str | None = None, centring: Centring = "mean",
           slide_vectors: dict[str, np.ndarray] | None = None) -> pa.Table:
    """Ranked neighbours with ``rank``, ``distance`` (cosine) and the table's metadata columns. ``centring``
    and ``slide_vectors`` (another pooling's vectors, by slide id) apply to slide search (tile search ranks by
    raw cosine)."""
    if sum(x is not None for x in (slide_id, tile_id, image)) != 1:
        raise SearchError("give exactly one of a slide id, a tile id or an image")
    if k < 1:
        raise SearchError(f"k must be at least 1, got {k}")
    if view.slide_level and slide_id is None:
        raise SearchError(f"view {view.view_id} holds slide vectors of slide encoder "
                          f"{view.model_name.removeprefix('slide:')} only: search it by slide (--slide); tiles and "
                          f"images are searched in its tile view {view.source_view_id}")
    kind = SLIDE_KIND if slide_id is not None else TILE_KIND
    if as_of is None:  # as of the last ledger commit: never the half of a write that did not complete
        as_of = committed_version(Catalog.of(ws), ws.lancedb_uri, view, kind)
    table = view_table(ws, view, kind, as_of)
    if slide_id is not None:
        return nearest_slides(table, slide_id, k, where, centring, view, slide_vectors)
    vector = _vector_of(table, "tile_id", tile_id, view) if tile_id is not None else embed_image(ws, view, image)
    return nearest(table, vector, k, where, cfg, exclude=tile_id)


def nearest_slides(table, slide_id: str, k: int, where: str | None, centring: Centring,
                   view: FeatureView | None = None, slide_vectors: dict[str, np.ndarray] | None = None) -> pa.Table:
    """The k slides nearest to ``slide_id`` by cosine distance after centring, exact, among the slides matching
    ``where``; the centre is the mean of every slide of the table (filtered or not)."""
    dataset = table.to_lance()
    data = dataset.to_table()
    ids = data.column("slide_id").to_pylist()
    if slide_id not in ids:
        name = view.view_id if view is not None else table.name
        raise SearchError(f"slide_id {slide_id!r} has no vector in view {name} (not embedded yet? run `histcode embed`)")
    vectors = replace_vectors(data, slide_vectors)
    allowed = set(ids)
    if where:
        with filter_errors(table.name, where, dataset.schema.names):
            allowed = set(dataset.to_table(columns=["slide_id"], filter=where).column("slide_id").to_pylist())
    candidates = np.array([i for i, s in enumerate(ids) if s in allowed and s != slide_id], dtype=np.int64)
    if len(candidates) == 0:
        return _ranked_table(data.slice(0, 0), np.zeros(0))
    dist = cosine_distances(vectors[ids.index(slide_id)], vectors[candidates], centre_of(vectors, centring))[0]
    top = ranked(dist, k)
    return _ranked_table(data.take(pa.array(candidates[top])), dist[top])


def _ranked_table(hits: pa.Table, distance: np.ndarray) -> pa.Table:
    hits = hits.drop_columns(["vector"]).append_column("distance", pa.array(distance, pa.float32()))
    return hits.add_column(0, "rank", pa.array(np.arange(1, hits.num_rows + 1, dtype=np.int32)))


Strategy = Literal["ann", "exact", "postfilter", "prefilter"]
POSTFILTER_MARGIN = 3.0  # postfilter: ask Lance for k / (fraction kept) x this (measured at 1M: see docs/benchmarks.md)
POSTFILTER_MAX_K = 4096  # postfilter: widened no further; past it the filter is applied before the search


class TileSearcher:
    """Nearest-neighbour search over one Lance table, holding its dataset handle and index type (opened once:
    reopening a dataset and listing its indices cost more than a query at 1M rows, measured in
    benchmarks/search.py), so a long-lived process such as a viewer answers queries at the index's own speed.

    Cosine distance on the raw vectors. With an ANN index, ``nprobes`` partitions are searched (and ``hnsw_ef``
    candidates kept per partition by the IVF_HNSW indices), then ``refine_factor`` x k re-ranked on the stored vectors.
    A filter (``where``) is answered by one of three paths, chosen by the rows it keeps (``strategy``), each
    measured at 1M rows in benchmarks/search.py:

    - ``exact``: at most ``search_exact_rows`` rows (ten slides): their row ids from the scalar indices, their
      vectors read by id and ranked in numpy. An index probed for a few slides misses neighbours a scan finds.
    - ``postfilter``: at least ``search_postfilter_fraction`` of the table (a subtype, half the patients): the
      index searched over every row for k / fraction x ``POSTFILTER_MARGIN`` candidates, the filter applied to
      them, and the search widened (x4) until k match. Lance's prefiltered search of a loose filter costs ~10x
      an unfiltered one (the allow-list of hundreds of thousands of rows), this ~1.2x.
    - ``prefilter``: in between: the filter applied before the index search (its row set from the scalar indices).

    Every path returns k hits whenever k rows match (an ANN path that finds fewer hands over to the next,
    ending with the exact one). The number of rows a filter keeps is counted once per filter and kept: the
    searcher reads one version of the table, so the count stays right for its lifetime.

    Hits carry every column but the vector and ``size``: a tile's side in level-0 pixels is one value per
    slide, and Lance reads a column that holds one value throughout (every 20x cohort's ``size``) ~6 ms slower
    per query than any other (measured at 1M rows: 6.6 ms for ``size`` against 0.6 ms for ``x``); ``with_sizes``
    adds it, once per slide, where it is wanted."""

    def __init__(self, table, cfg: FeaturesConfig) -> None:
        self.dataset = table.to_lance()
        self.kind = vector_index_type(table)
        self.cfg = cfg
        self.columns = [f.name for f in self.dataset.schema if f.name not in ("vector", "size")] + ["_distance"]
        self.rows = self.dataset.count_rows()
        self._sizes: dict[str, int] = {}
        self._matching: dict[str, int] = {}

    def matching(self, where: str) -> int:
        """The rows ``where`` keeps, counted through the scalar indices (once per filter: see the class)."""
        if where not in self._matching:
            if len(self._matching) >= 256:
                self._matching.pop(next(iter(self._matching)))
            self._matching[where] = self.dataset.count_rows(filter=where)
        return self._matching[where]

    def strategy(self, where: str | None) -> Strategy:
        """How a query filtered by ``where`` is answered (see the class): ``ann`` without a filter, else
        ``exact``, ``postfilter`` or ``prefilter`` by the rows it keeps; ``exact`` on a table without an index."""
        if not where:
            return "ann"
        kept = self.matching(where)
        if self.kind is None or kept <= self.cfg.search_exact_rows:
            return "exact"
        if kept >= self.cfg.search_postfilter_fraction * self.rows:
            return "postfilter"
        return "prefilter"

    def selective(self, where: str | None) -> bool:
        """Whether ``where`` keeps so few rows (at most ``search_exact_rows``) that they are searched exactly."""
        return bool(where) and self.strategy(where) == "exact"

    def query(self, vector: np.ndarray, k: int, where: str | None) -> dict:
        """Lance's nearest-neighbour query: through the index if there is one, else a flat scan."""
        cfg = self.cfg
        query: dict = {"column": "vector", "q": np.asarray(vector, dtype=np.float32), "k": k, "metric": "cosine"}
        if self.kind is None:
            query["use_index"] = False
            return query
        query["nprobes"] = cfg.nprobes
        if cfg.refine_factor:
            query["refine_factor"] = cfg.refine_factor
        if self.kind.startswith("IvfHnsw") and cfg.hnsw_ef:
            query["ef"] = max(cfg.hnsw_ef, k * (cfg.refine_factor or 1))  # HNSW needs ef >= the candidates asked
        return query

    def nearest(self, vector: np.ndarray, k: int, where: str | None = None, exclude: str | None = None, *,
                strategy: Strategy | None = None) -> pa.Table:
        """The k rows nearest to ``vector`` among those ``where`` keeps, ranked (``rank``, ``distance``), without
        the vectors and sizes; ``exclude``: a tile id left out of the hits (the query tile itself). It is left out
        by asking for k + 1 and dropping it, not by a ``tile_id !=`` filter, which Lance evaluates on every row
        before the search (measured in benchmarks/search.py). ``strategy`` forces a path (for measuring them)."""
        ask = k + 1 if exclude is not None else k
        name = self.dataset.uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".lance")
        with filter_errors(name, where, self.dataset.schema.names):
            how = strategy or self.strategy(where)
            if not where or how == "ann":
                hits = self.dataset.to_table(columns=self.columns, filter=where or None, prefilter=bool(where),
                                             nearest=self.query(vector, ask, where))
            elif how == "exact":
                hits = self._exact(vector, ask, where)
            else:
                hits = self._postfiltered(vector, ask, where) if how == "postfilter" else None
                if hits is None:
                    hits = self.dataset.to_table(columns=self.columns, filter=where, prefilter=True,
                                                 nearest=self.query(vector, ask, where))
                if hits.num_rows < min(ask, self.matching(where)):  # the probed partitions held too few
                    hits = self._exact(vector, ask, where)
        hits = hits.rename_columns(["distance" if c == "_distance" else c for c in hits.column_names])
        hits = hits.sort_by("distance").slice(0, ask)
        if exclude is not None:
            keep = np.flatnonzero(np.asarray(hits.column("tile_id").to_pylist(), dtype=object) != exclude)[:k]
            hits = hits.take(pa.array(keep, pa.int64()))
        ranks = pa.array(np.arange(1, hits.num_rows + 1, dtype=np.int32))
        return hits.add_column(0, "rank", ranks)

    def _postfiltered(self, vector: np.ndarray, k: int, where: str) -> pa.Table | None:
        """The index searched over every row for k / (fraction kept) x ``POSTFILTER_MARGIN`` candidates, those
        matching ``where`` kept, widened x4 until k match (or all rows that match do); None past
        ``POSTFILTER_MAX_K`` candidates."""
        kept = self.matching(where)
        want = min(k, kept)
        widened = math.ceil(k * self.rows / max(kept, 1) * POSTFILTER_MARGIN)
        while widened <= POSTFILTER_MAX_K:
            hits = self.dataset.to_table(columns=self.columns, filter=where, prefilter=False,
                                         nearest=self.query(vector, widened, None))
            if hits.num_rows >= want:
                return hits
            widened *= 4
        return None

    def _exact(self, vector: np.ndarray, k: int, where: str) -> pa.Table:
        """Exact search over the rows ``where`` keeps: their row ids from the scalar indices, their vectors read
        by id (a flat Lance scan with a filter reads every vector of the table: 3 s at 1M x 512; reading the
        other columns of every kept row doubled the time), the top k's other columns read last."""
        ids = self.dataset.to_table(columns=[], filter=where, with_row_id=True).column("_rowid").to_numpy()
        if len(ids) == 0:
            return self.dataset.to_table(columns=self.columns[:-1], limit=0).append_column(
                "_distance", pa.array([], pa.float32()))
        # pylance's take by row id (Lance's own scalar-indexed reads use it); pinned with the package
        column = self.dataset._take_rows(ids, columns=["vector"]).column("vector").combine_chunks()
        vectors = column.values.to_numpy(zero_copy_only=False).reshape(len(ids), column.type.list_size)
        q = np.asarray(vector, dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors)) * max(float(np.linalg.norm(q)), 1e-30)
        distance = 1.0 - np.divide(vectors @ q, norms, out=np.zeros(len(ids), np.float32), where=norms > 0)
        top = np.argpartition(distance, k - 1)[:k] if len(ids) > k else np.arange(len(ids))
        top = top[np.argsort(ids[top])]  # rows read in row-id order, as the take returns them
        rows = self.dataset._take_rows(ids[top], columns=self.columns[:-1])
        return rows.append_column("_distance", pa.array(distance[top], pa.float32()))

    def with_sizes(self, hits: pa.Table) -> pa.Table:
        """``hits`` with their ``size`` column (read once per slide through the slide_id index, then kept); a
        table without sizes (slide vectors) is returned as it is."""
        if "size" not in self.dataset.schema.names:
            return hits
        missing = sorted(set(hits.column("slide_id").to_pylist()) - set(self._sizes))
        for sid in missing:
            row = self.dataset.to_table(columns=["size"], filter=f"slide_id = {quote_literal(sid)}", limit=1)
            self._sizes[sid] = int(row.column("size")[0].as_py())
        sizes = pa.array([self._sizes[s] for s in hits.column("slide_id").to_pylist()], pa.int32())
        at = hits.column_names.index("y") + 1 if "y" in hits.column_names else hits.num_columns
        return hits.add_column(at, "size", sizes)


def nearest(table, vector: np.ndarray, k: int, where: str | None, cfg: FeaturesConfig,
            exclude: str | None = None) -> pa.Table:
    """One query: the k rows of a Lance table nearest to ``vector`` by cosine distance (``exclude``: a tile id
    left out), with their sizes where the table has them (see ``TileSearcher``)."""
    searcher = TileSearcher(table, cfg)
    return searcher.with_sizes(searcher.nearest(vector, k, where, exclude))
