"""Similarity search over a feature view: slides like a slide, tiles like a tile or like an image.

Cosine distance. ``where`` is a SQL filter on the table's columns (slide_id, patient_id, the promoted slide
attributes such as subtype, and x, y for tiles), applied before the nearest-neighbour search. The query slide
or tile itself is never returned.

Slides: by default the view's mean slide vector is subtracted from the query and the candidates before cosine
distance (``centring="mean"``; see ``histcode.features.retrieval`` for why), and the search is exact, in numpy,
over the whole slide table read at query time (one row per slide: 10,000 slides of 1024-d are 40 MB read and
a 10-million-multiply product per query). Lance's vector search (and its ANN index, built on the raw vectors)
cannot rank by centred cosine, so slide search does not use it; ``centring="none"`` ranks by raw cosine on the
same exact path. Tiles: Lance's search on raw vectors, exact (flat) while a table has no index; with an IVF
index, ``nprobes`` partitions are searched and ``refine_factor`` x k candidates are re-ranked exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from histcode.config import FeaturesConfig
from histcode.features.read import view_table
from histcode.features.registry import FeatureView
from histcode.features.retrieval import (
    Centring,
    centre_of,
    cosine_distances,
    ranked,
    replace_vectors,
)
from histcode.features.upkeep import has_vector_index
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, quote_literal
from histcode.tracking import Tracker
from histcode.workspace import Workspace


class SearchError(ValueError):
    """A query that cannot run: unknown id, unreadable image, bad filter."""


def _vector_of(table, column: str, key: str, view: FeatureView) -> np.ndarray:
    rows = table.to_lance().to_table(columns=["vector"], filter=f"{column} = {quote_literal(key)}")  # its id index
    if rows.num_rows == 0:
        raise SearchError(f"{column} {key!r} has no vector in view {view.view_id} (not embedded yet? run `histcode embed`)")
    return np.asarray(rows.column("vector")[0].as_py(), dtype=np.float32)


def embed_image(ws: Workspace, view: FeatureView, path: Path) -> np.ndarray:
    """The view's encoder applied to an image file (the whole image, resized to the view's input size)."""
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((view.image_px, view.image_px), Image.Resampling.BOX)
            pixels = np.asarray(im)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise SearchError(f"cannot read query image {path}: {exc}") from exc
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
    kind = SLIDE_KIND if slide_id is not None else TILE_KIND
    table = view_table(ws, view, kind, as_of)
    if slide_id is not None:
        return nearest_slides(table, slide_id, k, where, centring, view, slide_vectors)
    filters = [f"({where})"] if where else []
    if tile_id is not None:
        vector = _vector_of(table, "tile_id", tile_id, view)
        filters.append(f"tile_id != {quote_literal(tile_id)}")
    else:
        vector = embed_image(ws, view, Path(image))
    return nearest(table, vector, k, " AND ".join(filters) or None, cfg)


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
        try:
            allowed = set(dataset.to_table(columns=["slide_id"], filter=where).column("slide_id").to_pylist())
        except Exception as exc:  # lance reports filter errors as several exception types
            raise SearchError(f"search failed (check the filter {where!r}): {exc}") from exc
    candidates = np.array([i for i, s in enumerate(ids) if s in allowed and s != slide_id], dtype=np.int64)
    if len(candidates) == 0:
        return _ranked_table(data.slice(0, 0), np.zeros(0))
    dist = cosine_distances(vectors[ids.index(slide_id)], vectors[candidates], centre_of(vectors, centring))[0]
    top = ranked(dist, k)
    return _ranked_table(data.take(pa.array(candidates[top])), dist[top])


def _ranked_table(hits: pa.Table, distance: np.ndarray) -> pa.Table:
    hits = hits.drop_columns(["vector"]).append_column("distance", pa.array(distance, pa.float32()))
    return hits.add_column(0, "rank", pa.array(np.arange(1, hits.num_rows + 1, dtype=np.int32)))


def nearest(table, vector: np.ndarray, k: int, where: str | None, cfg: FeaturesConfig) -> pa.Table:
    """The k rows of a Lance table nearest to ``vector`` by cosine distance, ranked, without the vectors."""
    query = table.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector").distance_type("cosine").limit(k)
    if where:
        query = query.where(where, prefilter=True)
    if has_vector_index(table):
        query = query.nprobes(cfg.nprobes)
        if cfg.refine_factor:
            query = query.refine_factor(cfg.refine_factor)
    try:
        hits = query.to_arrow()
    except Exception as exc:  # lance reports filter errors as several exception types
        raise SearchError(f"search failed (check the filter {where!r}): {exc}") from exc
    hits = hits.drop_columns([c for c in ("vector",) if c in hits.column_names])
    hits = hits.rename_columns(["distance" if c == "_distance" else c for c in hits.column_names])
    hits = hits.sort_by("distance")
    ranks = pa.array(np.arange(1, hits.num_rows + 1, dtype=np.int32))
    return hits.add_column(0, "rank", ranks)
