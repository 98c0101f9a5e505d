"""LanceDB: one table of tile vectors and one of slide vectors per feature view.

Every table is created with BTREE scalar indices on its ids (``tile_id`` and ``slide_id``; ``slide_id`` on the
slide table), so that writes and per-slide reads cost what the batch costs, not what the table holds. A write
replaces the listed slides' rows completely: new slides are appended; slides already there are upserted
(``merge_insert`` on the id, which probes the id index), and their rows that are not in the batch (left from an
older tiling) are found through the ``slide_id`` index and deleted first, in a commit of their own that only
happens when a slide lost tiles. Rows added since the last index update are scanned, so ``features.upkeep``
folds them into the indices once they pass a size (``features.optimize_every_rows``). Every table carries its view's identity in its schema metadata,
and a write of vectors of another dimension or from another view is refused before anything is written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from histcode.errors import HistcodeError

log = logging.getLogger(__name__)

TILE_KIND, SLIDE_KIND = "tile", "slide"
VIEW_META_KEY = b"histcode.view"


class VectorStoreError(HistcodeError, ValueError):
    """A write that does not fit its table (dimension, view, columns); the message says what differs."""


@dataclass(frozen=True)
class TableSpec:
    """What a view's table must look like."""

    view_id: str
    kind: str  # tile | slide
    dim: int
    encoder_uri: str
    attribute_columns: tuple[str, ...] = ()  # slide attributes promoted to columns (filters)

    @property
    def name(self) -> str:
        return f"{self.kind}_emb__{self.view_id.replace('-', '_')}"

    @property
    def key(self) -> str:
        return "tile_id" if self.kind == TILE_KIND else "slide_id"

    @property
    def indexed_columns(self) -> tuple[str, ...]:
        return ("tile_id", "slide_id") if self.kind == TILE_KIND else ("slide_id",)

    def schema(self) -> pa.Schema:
        vector = pa.field("vector", pa.list_(pa.float32(), self.dim))
        attrs = [pa.field(c, pa.string()) for c in self.attribute_columns]
        if self.kind == TILE_KIND:
            fields = [pa.field("tile_id", pa.string()), pa.field("slide_id", pa.string()), pa.field("patient_id", pa.string()),
                      pa.field("x", pa.int64()), pa.field("y", pa.int64()), pa.field("size", pa.int32()), *attrs, vector]
        else:
            fields = [pa.field("slide_id", pa.string()), pa.field("patient_id", pa.string()),
                      pa.field("n_tiles", pa.int32()), *attrs, vector]
        meta = {VIEW_META_KEY: json.dumps({"view_id": self.view_id, "kind": self.kind, "dim": self.dim,
                                           "encoder_uri": self.encoder_uri}).encode()}
        return pa.schema(fields, metadata=meta)


def connect(uri: str | Path):
    """A LanceDB connection to a local folder (created if missing) or an object-store URI (``s3://...``)."""
    import lancedb

    if "://" not in str(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
    return lancedb.connect(str(uri))


def table_names(db) -> list[str]:
    result = db.list_tables()
    return list(getattr(result, "tables", result))


def open_table(db, spec: TableSpec, create: bool = True):
    """The view's table, created empty (with its id indices) if missing; refuses a table whose metadata
    belongs to another view. A writer (``create``) also gives a table from before the id indices its indices.
    Whether a missing table may be made anew is the writer's to decide against the catalog's ledger
    (``histcode.store.agreement``): `histcode embed` embeds again what the ledger records and the table lost."""
    if spec.name in table_names(db):
        table = db.open_table(spec.name)
        meta = json.loads((table.schema.metadata or {}).get(VIEW_META_KEY, b"{}"))
        if meta.get("view_id") != spec.view_id or meta.get("dim") != spec.dim:
            raise VectorStoreError(
                f"table {spec.name} holds view {meta.get('view_id')} at dim {meta.get('dim')}, "
                f"not view {spec.view_id} at dim {spec.dim}"
            )
        if create:
            ensure_id_indices(table, spec)
        return table
    if not create:
        raise VectorStoreError(f"no table {spec.name}: materialize the view first (histcode embed)")
    log.info("%s: new table for view %s (%d-d)", spec.name, spec.view_id, spec.dim)
    table = db.create_table(spec.name, schema=spec.schema())
    ensure_id_indices(table, spec)
    return table


def latest_versions(uri: str | Path, tables: list[str]) -> dict[str, int]:
    """The current version of each of the named tables that exists."""
    db = connect(uri)
    present = set(table_names(db))
    return {name: db.open_table(name).version for name in tables if name in present}


def indexed_columns(table) -> set[str]:
    return {c for ix in table.list_indices() for c in getattr(ix, "columns", [])}


def ensure_id_indices(table, spec: TableSpec) -> list[str]:
    """BTREE indices on the spec's id columns where the table lacks them; returns the columns indexed now."""
    from lancedb.index import BTree

    have = indexed_columns(table)
    made = [c for c in spec.indexed_columns if c not in have]
    for column in made:
        table.create_index(column, config=BTree())
        log.info("%s: BTREE index on %s", spec.name, column)
    return made


def to_batch(spec: TableSpec, columns: dict) -> pa.Table:
    """Columns (lists or arrays; ``vector`` as an (N, dim) array) as a table of the spec's schema."""
    vectors = np.asarray(columns["vector"], dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != spec.dim:
        raise VectorStoreError(
            f"{spec.name}: vectors of shape {tuple(vectors.shape)} do not fit view {spec.view_id} (dim {spec.dim}, "
            f"encoder {spec.encoder_uri})"
        )
    if not np.isfinite(vectors).all():
        raise VectorStoreError(f"{spec.name}: {int((~np.isfinite(vectors)).any(axis=1).sum())} vectors are not finite")
    schema = spec.schema()
    missing = [f.name for f in schema if f.name != "vector" and f.name not in columns]
    if missing:
        raise VectorStoreError(f"{spec.name}: missing columns {missing}")
    arrays = [pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), spec.dim) if f.name == "vector"
              else pa.array(columns[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def slide_filter(slide_ids: list[str]) -> str:
    """A Lance SQL predicate selecting these slides (ids quoted, quotes doubled)."""
    return key_filter("slide_id", slide_ids)


def delete_slides(uri: str | Path, tables: list[str], slide_ids: list[str]) -> int:
    """Delete the slides' rows from each of the named tables that exists; returns the rows removed."""
    db = connect(uri)
    present = set(table_names(db))
    removed = 0
    for name in tables:
        if name not in present:
            continue
        table = db.open_table(name)
        before = table.count_rows()
        table.delete(slide_filter(slide_ids))
        removed += before - table.count_rows()
    return removed


def slide_keys(table, spec: TableSpec, slide_ids: list[str]) -> pa.Array:
    """The ids (``spec.key``) of the listed slides' rows, read through the ``slide_id`` index."""
    data = table.to_lance().to_table(columns=[spec.key], filter=slide_filter(slide_ids))
    return data.column(spec.key).combine_chunks()


def upsert_slides(table, spec: TableSpec, batch: pa.Table, slide_ids: list[str]) -> int:
    """Write ``batch`` as the whole content of the listed slides and return the table version after it.

    The listed slides' rows are looked up through the ``slide_id`` index first. Slides the table does not hold
    yet (the common case while a cohort grows) are appended, which costs the same at any table size; otherwise
    the batch is upserted by key (``merge_insert`` probing the id index), after the rows the batch no longer
    has are deleted (a commit of its own, only when there are such rows)."""
    import pyarrow.compute as pc

    if batch.schema.field("vector").type != spec.schema().field("vector").type:
        raise VectorStoreError(f"{spec.name}: vector type {batch.schema.field('vector').type} is not "
                               f"{spec.schema().field('vector').type}")
    missing = sorted(set(batch.column("slide_id").to_pylist()) - set(slide_ids)) if batch.num_rows else []
    if missing:
        raise VectorStoreError(f"{spec.name}: rows of slides {missing[:3]} that the write does not list")
    existing = slide_keys(table, spec, slide_ids) if slide_ids else pa.array([], pa.string())
    if len(existing):
        keep = batch.column(spec.key).combine_chunks()
        stale = pc.filter(existing, pc.invert(pc.is_in(existing, value_set=keep))).to_pylist()
        if stale:
            table.delete(slide_filter(slide_ids) + f" AND {key_filter(spec.key, stale)}")
    if batch.num_rows:
        if len(existing):
            table.merge_insert(spec.key).when_matched_update_all().when_not_matched_insert_all().execute(batch)
        else:
            table.add(batch)
    return table.version


def quote_literal(value: str) -> str:
    """A Lance SQL string literal (quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def key_filter(column: str, values: list[str]) -> str:
    """A Lance SQL predicate ``column IN (...)``."""
    return f"{column} IN (" + ", ".join(quote_literal(v) for v in values) + ")"
