"""The DuckDB catalog: slides, tiling specs, the tiling ledger and tiles.

DuckDB allows one writer process per file, and a writer blocks other processes from opening it, so every
method opens a connection for the duration of one operation and closes it. Each write is one transaction:
a slide's tiles appear all together or not at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from histcode.store.records import FAILED, INVALIDATED, OK, SlideRecord, TilingRecord, utcnow
from histcode.store.schema import DOWNSTREAM_OF_SLIDE, SCHEMA_VERSION, TABLES

log = logging.getLogger(__name__)

TILE_SCHEMA = pa.schema(
    [
        ("tile_id", pa.string()),
        ("slide_id", pa.string()),
        ("spec_id", pa.string()),
        ("x", pa.int64()),
        ("y", pa.int64()),
        ("size", pa.int32()),
        ("level", pa.int32()),
        ("tissue_fraction", pa.float32()),
        ("white_fraction", pa.float32()),
        ("laplacian_var", pa.float32()),
    ]
)


class CatalogError(RuntimeError):
    """The catalog could not be opened or written; the message says which file and why."""


class Catalog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- connections -------------------------------------------------------------------------------------
    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.path.exists():
            raise CatalogError(f"no catalog at {self.path}: run `histcode ingest` first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as exc:
            raise CatalogError(
                f"cannot open the catalog {self.path}{' read-only' if read_only else ''}: {exc} "
                "(another histcode process writing to it?)"
            ) from exc
        try:
            if not read_only:
                self._ensure_schema(con)
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.connect() as con:
            con.begin()
            try:
                yield con
            except BaseException:
                con.rollback()
                raise
            con.commit()

    @staticmethod
    def _ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
        for ddl in TABLES.values():
            con.execute(ddl)
        rows = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        if not rows:
            con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        elif int(rows[0][0]) > SCHEMA_VERSION:
            raise CatalogError(f"catalog schema {rows[0][0]} is newer than this histcode ({SCHEMA_VERSION})")

    # -- slides ------------------------------------------------------------------------------------------
    def get_slide(self, slide_id: str) -> dict | None:
        rows = self.query("SELECT * FROM slides WHERE slide_id = ?", [slide_id])
        return rows[0] if rows else None

    def slides(self, status: str | None = None) -> list[dict]:
        if status is None:
            return self.query("SELECT * FROM slides ORDER BY slide_id")
        return self.query("SELECT * FROM slides WHERE status = ? ORDER BY slide_id", [status])

    def put_slide(self, record: SlideRecord) -> str:
        """Insert or replace a slide; returns 'new', 'changed' or 'same'.

        'changed' means the pixels or their scale differ from the registered ones (content hash, mpp or
        status): every row derived from the slide's pixels is then cleared and its tilings are marked
        invalidated, in the same transaction as the new slide row."""
        row = record.as_row()
        now = utcnow()
        fingerprint = (record.content_hash, record.mpp_x, record.mpp_y, record.status)
        with self.transaction() as con:
            old = con.execute(
                "SELECT content_hash, mpp_x, mpp_y, status, ingested_at FROM slides WHERE slide_id = ?", [record.slide_id]
            ).fetchall()
            if not old:
                outcome = "new"
            elif tuple(old[0][:4]) == fingerprint:
                outcome = "same"
            else:
                outcome = "changed"
                before = f"{str(old[0][0])[:12]} at {old[0][1]} um/px"
                after = f"{str(record.content_hash)[:12]} at {record.mpp_x} um/px"
                self._invalidate(con, record.slide_id, f"slide changed ({before} -> {after})")
            con.execute("DELETE FROM slides WHERE slide_id = ?", [record.slide_id])
            cols = list(row) + ["ingested_at", "updated_at"]
            values = list(row.values()) + [old[0][4] if old else now, now]
            con.execute(f"INSERT INTO slides ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", values)
        return outcome

    @staticmethod
    def _invalidate(con: duckdb.DuckDBPyConnection, slide_id: str, reason: str) -> None:
        for table in DOWNSTREAM_OF_SLIDE:
            con.execute(f"DELETE FROM {table} WHERE slide_id = ?", [slide_id])
        con.execute(
            "UPDATE tilings SET status = ?, reason = ?, n_tiles = 0 WHERE slide_id = ?", [INVALIDATED, reason, slide_id]
        )
        log.info("%s: %s; derived rows invalidated", slide_id, reason)

    # -- tiling ------------------------------------------------------------------------------------------
    def put_spec(self, spec_id: str, spec: dict) -> None:
        with self.transaction() as con:
            exists = con.execute("SELECT 1 FROM tiling_specs WHERE spec_id = ?", [spec_id]).fetchall()
            if not exists:
                con.execute(
                    "INSERT INTO tiling_specs VALUES (?, ?, ?, ?, ?, ?)",
                    [spec_id, spec["tile_px"], spec["target_mpp"], spec["min_tissue_fraction"], json.dumps(spec, sort_keys=True), utcnow()],
                )

    def tiling(self, slide_id: str, spec_id: str) -> dict | None:
        rows = self.query("SELECT * FROM tilings WHERE slide_id = ? AND spec_id = ?", [slide_id, spec_id])
        return rows[0] if rows else None

    def tilings(self, spec_id: str | None = None) -> list[dict]:
        if spec_id is None:
            return self.query("SELECT * FROM tilings ORDER BY slide_id, spec_id")
        return self.query("SELECT * FROM tilings WHERE spec_id = ? ORDER BY slide_id", [spec_id])

    def put_tiling(self, record: TilingRecord, tiles: pa.Table | None) -> None:
        """Replace a slide's tiles for one spec and its ledger row, atomically. The slide must still have the
        content hash the tiles were computed from (a concurrent re-ingest wins)."""
        with self.transaction() as con:
            current = con.execute("SELECT content_hash FROM slides WHERE slide_id = ?", [record.slide_id]).fetchall()
            if not current or current[0][0] != record.content_hash:
                raise CatalogError(
                    f"{record.slide_id}: slide changed or was removed while it was being tiled; rerun `histcode tile`"
                )
            con.execute("DELETE FROM tiles WHERE slide_id = ? AND spec_id = ?", [record.slide_id, record.spec_id])
            con.execute("DELETE FROM tilings WHERE slide_id = ? AND spec_id = ?", [record.slide_id, record.spec_id])
            if tiles is not None and tiles.num_rows:
                tiles = tiles.select(TILE_SCHEMA.names).cast(TILE_SCHEMA)
                con.register("_new_tiles", tiles)
                con.execute("INSERT INTO tiles SELECT * FROM _new_tiles")
                con.unregister("_new_tiles")
            row = record.as_row()
            con.execute(f"INSERT INTO tilings ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))

    def tiles(self, slide_id: str | None = None, spec_id: str | None = None) -> pa.Table:
        clauses, params = [], []
        if slide_id is not None:
            clauses.append("slide_id = ?")
            params.append(slide_id)
        if spec_id is not None:
            clauses.append("spec_id = ?")
            params.append(spec_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        if not self.path.exists():
            return TILE_SCHEMA.empty_table()
        with self.connect(read_only=True) as con:
            return con.sql(f"SELECT * FROM tiles {where} ORDER BY slide_id, spec_id, y, x", params=params).to_arrow_table()

    # -- generic -----------------------------------------------------------------------------------------
    def query(self, sql: str, params: list | None = None) -> list[dict]:
        """Rows as dicts, from a read-only connection (an empty list when no catalog exists yet)."""
        if not self.path.exists():
            return []
        with self.connect(read_only=True) as con:
            cur = con.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]


__all__ = ["Catalog", "CatalogError", "FAILED", "OK", "INVALIDATED", "TILE_SCHEMA"]
