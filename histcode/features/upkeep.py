"""Keeping view tables healthy after writes: compaction and index updates scheduled by size, an ANN index past
a size threshold, and tags.

Rows written since the last index update are scanned by every upsert and per-slide read, so their number is
what a commit costs beyond its own rows. ``optimize`` (compaction, folding new rows into the id and vector
indices, pruning versions older than a week) therefore runs when ``features.optimize_every_rows`` rows are
unindexed or a table has more than ``features.optimize_max_fragments`` fragments, not after every write: the
cost per commit stays flat as a cohort grows, and a rerun that wrote nothing does nothing.
Below ``features.index_min_rows`` vectors, exact (flat) search is fast and exact; above it an IVF index
(IVF_HNSW_SQ by default, IVF_PQ optionally) is built once, and later ``optimize`` calls fold new rows into it.
A tag names a table version (``--tag``), so training can record exactly which vectors it used and reads can
go back to them (``as_of``).
With the vector index come scalar indices on the filter columns (``filter_indices``: a BTREE on ``patient_id``,
BITMAPs on the promoted slide attributes; ``tile_id`` and ``slide_id`` have theirs from the start), so a
search's ``where`` is counted and answered through them instead of read over every row (see
``histcode.features.search.TileSearcher``); ``optimize`` folds new rows into them like the others.
"""

from __future__ import annotations

import logging
import math

from histcode.config import FeaturesConfig

log = logging.getLogger(__name__)


def index_config(cfg: FeaturesConfig, rows: int, dim: int):
    """The ANN index of ``cfg``: IVF with HNSW graphs per partition on 8-bit scalar-quantised (IVF_HNSW_SQ, 1 B per
    dimension) or full vectors (IVF_HNSW_FLAT, 4 B), product-quantised codes (IVF_PQ), or exact scans of the
    probed partitions (IVF_FLAT)."""
    from lancedb.index import IvfFlat, IvfHnswFlat, IvfHnswSq, IvfPq

    partitions = cfg.index_partitions or max(1, min(4096, round(cfg.index_partition_scale * math.sqrt(rows))))
    if cfg.index_type == "IVF_PQ":
        width = cfg.index_subvector_dims  # dimensions per PQ sub-vector: one byte codes each
        sub = next(d for d in (dim // width, dim // (2 * width), dim // (4 * width), 1) if d >= 1 and dim % d == 0)
        return IvfPq(distance_type="cosine", num_partitions=partitions, num_sub_vectors=sub)
    if cfg.index_type == "IVF_HNSW_FLAT":
        return IvfHnswFlat(distance_type="cosine", num_partitions=partitions)
    if cfg.index_type == "IVF_FLAT":
        return IvfFlat(distance_type="cosine", num_partitions=partitions)
    return IvfHnswSq(distance_type="cosine", num_partitions=partitions)


def vector_index_type(table) -> str | None:
    """The type of the table's vector index (``IvfHnswSq``, ``IvfPq``, ...), or None without one."""
    for ix in table.list_indices():
        if "vector" in list(getattr(ix, "columns", [])):
            return str(ix.index_type)
    return None


FILTER_INDEX_SKIP = ("tile_id", "slide_id", "vector", "x", "y", "size", "n_tiles")  # indexed already, or not filters


def filter_indices(table) -> list[str]:
    """Scalar indices on the table's filter columns where it lacks them: a BTREE on ``patient_id`` (many values),
    a BITMAP on every other string column (the promoted slide attributes: a few values each). Returns the
    columns indexed now."""
    from lancedb.index import BTree, Bitmap

    have = {c for ix in table.list_indices() for c in getattr(ix, "columns", [])}
    made = []
    for field in table.schema:
        if field.name in FILTER_INDEX_SKIP or field.name in have or str(field.type) not in ("string", "large_string"):
            continue
        table.create_index(field.name, config=BTree() if field.name == "patient_id" else Bitmap())
        made.append(field.name)
    return made


def has_vector_index(table) -> bool:
    return vector_index_type(table) is not None


def unindexed_rows(table) -> int:
    """Rows the table's indices do not cover yet (the most over its indices; all rows without one)."""
    worst = None
    for ix in table.list_indices():
        stats = table.index_stats(ix.name)
        if stats is not None:
            worst = max(worst or 0, int(stats.num_unindexed_rows))
    return table.count_rows() if worst is None else worst


def needs_optimize(table, cfg: FeaturesConfig) -> str | None:
    """Why the table is due for ``optimize``, or None."""
    unindexed = unindexed_rows(table)
    if unindexed >= cfg.optimize_every_rows:
        return f"{unindexed} rows unindexed"
    fragments = len(table.to_lance().get_fragments())
    if fragments > cfg.optimize_max_fragments:
        return f"{fragments} fragments"
    return None


def tag_version(table, tag: str) -> None:
    """Point ``tag`` at the table's current version (moving it if it exists)."""
    if tag in table.tags.list():
        table.tags.update(tag, table.version)
    else:
        table.tags.create(tag, table.version)


def maintain_tables(tables: dict, cfg: FeaturesConfig, changed: bool, tag: str | None = None) -> list[str]:
    notes = []
    for kind, table in tables.items():
        due = needs_optimize(table, cfg) if changed else None
        if due:
            table.optimize()
            notes.append(f"{kind}: {due}: compacted and indices updated, version {table.version}")
        rows = table.count_rows()
        if rows >= cfg.index_min_rows and not has_vector_index(table):
            dim = table.schema.field("vector").type.list_size
            table.create_index("vector", config=index_config(cfg, rows, dim))  # new API: first argument is the column
            notes.append(f"{kind}: {cfg.index_type} index on {rows} vectors")
        if has_vector_index(table):
            made = filter_indices(table)
            if made:
                notes.append(f"{kind}: filter indices on {', '.join(made)}")
        if tag:
            tag_version(table, tag)
            notes.append(f"{kind}: tag {tag!r} -> version {table.version}")
    return notes
