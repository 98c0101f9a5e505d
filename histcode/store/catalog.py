"""The DuckDB catalog: cohorts, slides, tiling specs, the tiling ledger and tiles.

DuckDB allows one writer process per file, and a writer blocks other processes from opening it, so every
method opens a connection for the duration of one operation and closes it. Each write is one transaction:
a slide's tiles appear all together or not at all.

A catalog opened for a workspace (``Catalog.of``) stores file paths that lie inside the workspace relative
to it, so a copied or moved workspace finds its own slides; and when a slide's content or scale changes it
removes the slide's rows from every feature view's vector tables in the same step as it clears the slide's
tiles and ledgers (the vector delete runs inside the catalog transaction, before it commits).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from histcode.runtime import failpoint
from histcode.store.cohorts import CatalogError, CohortRegistry
from histcode.store.records import (
    FAILED,
    INFERENCE,
    INVALIDATED,
    OK,
    TRAINING,
    SlideRecord,
    TilingRecord,
    is_path_attribute,
    utcnow,
)
from histcode.store.schema import DOWNSTREAM_OF_SLIDE, MIGRATIONS, SCHEMA_VERSION, TABLES

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


class SlideChangedError(CatalogError):
    """A slide's content changed between reading it and writing what was derived from it."""


LOCK_WAIT_S = 30.0  # how long to wait for another process that holds the catalog's write lock
LOCK_WAIT_ENV = "HISTCODE_CATALOG_WAIT_S"  # ... or this many seconds (0: do not wait)


def lock_holder(message: str) -> str:
    """'PID 123 (histcode embed) on host' from DuckDB's lock error, as far as it can be told."""
    import re
    import socket

    found = re.search(r"PID (\d+)", message)
    if not found:
        return f"another process on {socket.gethostname()}"
    pid, what = int(found.group(1)), ""
    try:
        import psutil

        what = " (" + " ".join(psutil.Process(pid).cmdline())[:120] + ")"
    except Exception:  # noqa: BLE001 -- gone, or not ours to read: the pid alone still helps
        pass
    return f"PID {pid}{what} on {socket.gethostname()}"


DEFAULT_COHORT = "default"
TILING_PATH_COLUMNS = ("thumbnail_path", "mask_path")


class Catalog(CohortRegistry):
    def __init__(self, path: str | Path, root: str | Path | None = None, vectors_uri: str | None = None) -> None:
        """``root``: the workspace, against which paths inside it are stored relative; ``vectors_uri``: the
        LanceDB whose feature views lose a slide's rows when its content changes (both None: paths as given,
        vectors untouched)."""
        self.path = Path(path)
        self.root = Path(root).resolve() if root is not None else None
        self.vectors_uri = vectors_uri

    @classmethod
    def of(cls, ws) -> Catalog:
        """The catalog of a workspace (``histcode.workspace.Workspace``)."""
        return cls(ws.catalog_path, ws.root, ws.lancedb_uri)

    # -- paths ---------------------------------------------------------------------------------------------
    def stored_path(self, path: str | Path | None) -> str | None:
        """How a file path is stored: relative (POSIX) to the workspace when it lies inside it, else absolute."""
        if path is None or self.root is None:
            return None if path is None else str(path)
        for candidate in (Path(os.path.abspath(path)), Path(path).resolve()):
            try:
                return candidate.relative_to(self.root).as_posix()
            except ValueError:
                continue
        return str(path)

    def real_path(self, stored: str | None) -> str | None:
        """A stored path as an absolute path in this workspace."""
        if stored is None or self.root is None or Path(stored).is_absolute():
            return stored
        return str(self.root / stored)

    def _attributes(self, attributes: str | None, convert) -> str | None:
        if not attributes:
            return attributes
        values = json.loads(attributes)
        return json.dumps({k: convert(v) if is_path_attribute(k) and v else v for k, v in values.items()},
                          sort_keys=True)

    def resolved(self, row: dict) -> dict:
        """A row of ``slides`` read elsewhere (a copy of the table) with its paths resolved as ``slides()`` does."""
        return self._slide_out(dict(row))

    def _slide_out(self, row: dict) -> dict:
        row["path"] = self.real_path(row["path"])
        if "attributes" in row:
            row["attributes"] = self._attributes(row["attributes"], self.real_path)
        return row

    # -- connections -------------------------------------------------------------------------------------
    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.path.exists():
            raise CatalogError(f"no catalog at {self.path}: run `histcode ingest` first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._open(read_only)
        try:
            if read_only and self._version(con) != SCHEMA_VERSION:
                con.close()  # a catalog written by an older histcode: upgrade it once, then read
                self.upgrade()
                con = self._open(read_only)
            if not read_only:
                self._ensure_schema(con)
            yield con
        except Exception as exc:  # noqa: BLE001 -- a damaged file or a fault of the machine is told as such
            told = self._told(exc, read_only)
            if told is exc:
                raise
            raise told from exc
        finally:
            self._close(con)

    def _told(self, exc: Exception, read_only: bool) -> Exception:
        """``exc`` as the user should read it: the catalog damaged (with its backup), a fault of the machine
        (nothing of the transaction committed), or as it is."""
        from histcode.errors import machine_fault
        from histcode.store.backup import damaged, is_damage

        if is_damage(exc):
            return exc if isinstance(exc, CatalogError) else damaged(self.path, exc)
        doing = f"{'reading' if read_only else 'writing'} the catalog {self.path}"
        return machine_fault(exc, doing, "nothing of the transaction was committed") or exc

    def _close(self, con: duckdb.DuckDBPyConnection) -> None:
        """Close (DuckDB checkpoints its write-ahead log into the file here, which can meet a full disk)."""
        from histcode.errors import machine_fault

        try:
            con.close()
        except duckdb.Error as exc:
            fault = machine_fault(exc, f"checkpointing the catalog {self.path}",
                                  f"what was committed is kept in {self.path.name}.wal and replayed at the next open")
            if fault is None:
                raise
            raise fault from exc

    def upgrade(self) -> None:
        """Bring the catalog's schema up to this histcode's (migrations run inside a write connection)."""
        with self.connect():
            pass

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """Connect, waiting with backoff while another process holds the file's lock (DuckDB allows one
        writer process, and a writer excludes readers from other processes)."""
        import time

        wait = float(os.environ.get(LOCK_WAIT_ENV) or LOCK_WAIT_S)
        deadline, delay = time.monotonic() + wait, 0.05
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as exc:
                locked = isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower()
                if not locked:
                    told = self._told(exc, read_only)
                    if told is not exc:
                        raise told from exc
                if locked and time.monotonic() > deadline:
                    raise CatalogError(
                        f"the catalog {self.path} is in use by {lock_holder(str(exc))}; waited {wait:.0f} s "
                        f"(${LOCK_WAIT_ENV} sets how long). DuckDB allows one writing process per catalog: run one "
                        "writing command per workspace at a time, or give each user a workspace of their own") from exc
                if not locked:
                    raise CatalogError(f"cannot open the catalog {self.path}{' read-only' if read_only else ''}: "
                                       f"{exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.connect() as con:
            con.begin()
            try:
                yield con
            except BaseException:
                con.rollback()
                raise
            failpoint("catalog.commit")  # the transaction is complete, not committed: a kill or a full disk here
            con.commit()

    @staticmethod
    def _version(con: duckdb.DuckDBPyConnection) -> int | None:
        rows = con.execute("SELECT 1 FROM information_schema.tables WHERE table_name = 'meta'").fetchall()
        return int(con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()[0][0]) if rows else None

    @classmethod
    def _ensure_schema(cls, con: duckdb.DuckDBPyConnection) -> None:
        found = cls._version(con)
        if found is not None and found > SCHEMA_VERSION:
            raise CatalogError(f"catalog schema {found} is newer than this histcode ({SCHEMA_VERSION}); upgrade histcode")
        if found is not None:
            for version in range(found + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS.get(version, []):
                    con.execute(statement)
        for ddl in TABLES.values():
            con.execute(ddl)
        con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])

    # -- slides ------------------------------------------------------------------------------------------
    def get_slide(self, slide_id: str) -> dict | None:
        rows = self.query("SELECT * FROM slides WHERE slide_id = ?", [slide_id])
        return self._slide_out(rows[0]) if rows else None

    def slides(self, status: str | None = None) -> list[dict]:
        """Slides (optionally only those with ``status``), paths resolved."""
        rows = self.query("SELECT * FROM slides WHERE (? IS NULL OR status = ?) ORDER BY slide_id", [status, status])
        return [self._slide_out(r) for r in rows]

    def slide_with_content(self, content_hash: str | None, other_than: str) -> dict | None:
        """A healthy slide other than ``other_than`` with these pixels, if one is registered."""
        if content_hash is None:
            return None
        rows = self.query("SELECT slide_id, cohort FROM slides WHERE content_hash = ? AND slide_id != ? AND status = 'ok' "
                          "ORDER BY slide_id LIMIT 1", [content_hash, other_than])
        return rows[0] if rows else None

    def put_slide(self, record: SlideRecord) -> str:
        """Insert or replace a slide; returns 'new', 'changed', 'same' or 'unreachable'.

        'changed': the pixels (content hash) or their scale (mpp) differ from the registered ones; every row
        derived from the slide's pixels is cleared and its tilings are marked invalidated, in the same
        transaction as the new slide row. 'unreachable': the file could not be read at all (gone, empty,
        no permission); the slide is marked failed with the reason but what was known about its pixels, and
        everything derived from them, is kept until its content can be compared again."""
        now = utcnow()
        with self.transaction() as con:
            cur = con.execute("SELECT content_hash, mpp_x, mpp_y, ingested_at FROM slides WHERE slide_id = ?",
                              [record.slide_id])
            old = cur.fetchall()
            old_hash, old_mx, old_my, ingested = old[0] if old else (None, None, None, now)
            stored = self.stored_path(record.path)
            if record.content_hash is None and old_hash is not None:
                con.execute("UPDATE slides SET status = ?, reason = ?, path = ?, updated_at = ? WHERE slide_id = ?",
                            [record.status, record.reason, stored, now, record.slide_id])
                return "unreachable"
            if old_hash is None:
                outcome = "new"
            elif old_hash != record.content_hash or (record.mpp_x is not None and (old_mx, old_my) != (record.mpp_x, record.mpp_y)):
                outcome = "changed"
                before = f"{old_hash[:12]} at {old_mx} um/px"
                after = f"{str(record.content_hash)[:12]} at {record.mpp_x} um/px"
                self._invalidate(con, record.slide_id, f"slide changed ({before} -> {after})")
            else:
                outcome = "same"
            row = record.as_row()
            row["cohort"] = record.cohort or DEFAULT_COHORT
            self._ensure_cohort(con, row["cohort"], None)
            row["path"] = stored
            row["attributes"] = self._attributes(record.attributes, self.stored_path)
            con.execute("DELETE FROM slides WHERE slide_id = ?", [record.slide_id])
            cols = list(row) + ["ingested_at", "updated_at"]
            values = list(row.values()) + [ingested, now]
            con.execute(f"INSERT INTO slides ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", values)
        return outcome

    def _invalidate(self, con: duckdb.DuckDBPyConnection, slide_id: str, reason: str) -> None:
        """Everything derived from a slide's pixels goes, in the caller's transaction: tiles, ledgers, tile
        scores and (before the transaction commits) its rows in every feature view's vector tables."""
        for table in DOWNSTREAM_OF_SLIDE:
            con.execute(f"DELETE FROM {table} WHERE slide_id = ?", [slide_id])
        con.execute("DELETE FROM patient_predictions WHERE list_contains(slide_ids, ?)", [slide_id])  # pooled from it
        con.execute(
            "UPDATE tilings SET status = ?, reason = ?, n_tiles = 0 WHERE slide_id = ?", [INVALIDATED, reason, slide_id]
        )
        if self.vectors_uri is not None:
            from histcode.store.agreement import update_versions
            from histcode.store.vectors import delete_slides, latest_versions

            tables = [r[0] for r in con.execute("SELECT DISTINCT lance_table FROM feature_views").fetchall()]
            removed = delete_slides(self.vectors_uri, tables, [slide_id]) if tables else 0
            if removed:  # readers read the tables as of the ledger: now without the slide's rows
                update_versions(con, latest_versions(self.vectors_uri, tables))
            log.info("%s: %d vectors removed from %d feature-view tables", slide_id, removed, len(tables))
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

    def _tiling_out(self, row: dict) -> dict:
        for col in TILING_PATH_COLUMNS:
            row[col] = self.real_path(row.get(col))
        return row

    def tiling(self, slide_id: str, spec_id: str) -> dict | None:
        rows = self.query("SELECT * FROM tilings WHERE slide_id = ? AND spec_id = ?", [slide_id, spec_id])
        return self._tiling_out(rows[0]) if rows else None

    def tilings(self, spec_id: str | None = None) -> list[dict]:
        rows = self.query("SELECT * FROM tilings WHERE (? IS NULL OR spec_id = ?) ORDER BY slide_id, spec_id",
                          [spec_id, spec_id])
        return [self._tiling_out(r) for r in rows]

    def put_tiling(self, record: TilingRecord, tiles: pa.Table | None) -> None:
        """Replace a slide's tiles for one spec and its ledger row, atomically. The slide must still have the
        content hash the tiles were computed from (a concurrent re-ingest wins)."""
        with self.transaction() as con:
            current = con.execute("SELECT content_hash FROM slides WHERE slide_id = ?", [record.slide_id]).fetchall()
            if not current or current[0][0] != record.content_hash:
                raise SlideChangedError(
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
            for col in TILING_PATH_COLUMNS:
                row[col] = self.stored_path(row[col])
            con.execute(f"INSERT INTO tilings ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))

    def tiled_slides(self, spec_id: str, cohorts: list[str] | None = None) -> list[dict]:
        """Healthy slides whose tiling under ``spec_id`` is done, with tiles, for their current content
        (optionally only those of ``cohorts``)."""
        rows = self.query(
            """SELECT s.* FROM slides s JOIN tilings t ON t.slide_id = s.slide_id AND t.spec_id = ?
               WHERE s.status = 'ok' AND t.status = 'ok' AND t.content_hash = s.content_hash AND t.n_tiles > 0
               ORDER BY s.slide_id""",
            [spec_id],
        )
        return [self._slide_out(r) for r in rows if cohorts is None or r["cohort"] in cohorts]

    def replace_table(self, con: duckdb.DuckDBPyConnection, table: str, frame) -> None:
        """Replace a table's rows with a pandas frame (inside the caller's transaction); columns by name."""
        con.execute(f"DELETE FROM {table}")
        if len(frame):
            con.register("_frame", frame)
            cols = ", ".join(f'"{c}"' for c in frame.columns)
            con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _frame")
            con.unregister("_frame")

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

    def training_slides(self, spec_id: str, requested_cohorts: tuple[str, ...] | list[str] = ()) -> list[dict]:
        """The tiled slides of the training cohorts (``requested_cohorts``, or all): what pretraining, labels
        and heads read."""
        return self.tiled_slides(spec_id, self.training_cohorts(requested_cohorts))

    # -- generic -----------------------------------------------------------------------------------------
    def query(self, sql: str, params: list | None = None) -> list[dict]:
        """Rows as dicts, from a read-only connection (an empty list when no catalog exists yet)."""
        if not self.path.exists():
            return []
        with self.connect(read_only=True) as con:
            cur = con.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]


__all__ = ["Catalog", "CatalogError", "DEFAULT_COHORT", "FAILED", "INFERENCE", "OK", "INVALIDATED", "TILE_SCHEMA",
           "TRAINING"]
