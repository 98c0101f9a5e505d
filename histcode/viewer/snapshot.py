"""What the viewer's pages read of the catalog, kept in an in-memory DuckDB and read again when the catalog changes.

DuckDB lets one process write a catalog file while no other holds it open, so the viewer cannot keep a connection
to it (`histcode predict` or `heads` would wait on the viewer), and opening the file per request costs more than
the query. So the tables the pages read (slides, cohorts, tilings, labels, stored predictions) are copied into an
in-memory database in one read, and copied again when the catalog file or its write-ahead log has changed (a
``stat`` per request says so). Queries on the copy are plain DuckDB SQL, sorted, filtered and paged there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb

from histcode.runtime import file_stamps
from histcode.store.catalog import Catalog

log = logging.getLogger(__name__)

TABLES = ("slides", "cohorts", "tilings", "slide_labels", "predictions", "patient_predictions", "feature_views",
          "vector_versions")


class CatalogSnapshot:
    """An in-memory copy of the catalog's viewer tables, current as of the last change of the file."""

    def __init__(self, catalog: Catalog, derived: dict[str, str] | None = None) -> None:
        """``derived``: tables computed once per copy, name -> SELECT over the copied tables."""
        self.catalog = catalog
        self.derived = dict(derived or {})
        self._lock = threading.Lock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._stamp: tuple | None = None
        self._memo: dict = {}

    def _file_stamp(self) -> tuple:
        return file_stamps((self.catalog.path, self.catalog.path.with_name(self.catalog.path.name + ".wal")))

    def _load(self) -> duckdb.DuckDBPyConnection:
        memory = duckdb.connect()
        with self.catalog.connect(read_only=True) as con:
            present = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            for table in TABLES:
                if table in present:
                    memory.register("_copy", con.sql(f'SELECT * FROM "{table}"').to_arrow_table())
                    memory.execute(f'CREATE TABLE "{table}" AS SELECT * FROM _copy')
                    memory.unregister("_copy")
        if "predictions" in present:
            for name, select in self.derived.items():
                memory.execute(f'CREATE TABLE "{name}" AS {select}')
        return memory

    @contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The copy, read again first if the catalog changed; one query at a time (the lock is held)."""
        stamp = self._file_stamp()
        with self._lock:
            if self._con is None or stamp != self._stamp:
                old, self._con = self._con, self._load()
                self._stamp, self._memo = stamp, {}
                if old is not None:
                    old.close()
                log.debug("catalog snapshot read (%s)", self.catalog.path)
            yield self._con

    def query(self, sql: str, params: list | None = None, *, memo: bool = False) -> list[dict]:
        """Rows as dicts; ``memo``: kept until the copy is read again (for summaries every page shows)."""
        with self.connection() as con:
            key = (sql, tuple(params or ()))
            if memo and key in self._memo:
                return self._memo[key]
            cur = con.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
            if memo:
                self._memo[key] = rows
            return rows
