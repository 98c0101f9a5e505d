"""Read-only SQL over the whole store: the DuckDB catalog and every feature view's Lance tables.

Names: the catalog's tables (``slides``, ``tiles``, ``tilings``, ``feature_views``, ...), each view's tables as
``tile_emb__<view>`` / ``slide_emb__<view>`` (dashes in the view id become underscores), and
``current_predictions`` (the stored prediction each slide's output is shown with, ``histcode.store.predictions``),
``current_patient_predictions`` (the same per patient, ``histcode.store.patient_predictions``),
``tile_embeddings`` / ``slide_embeddings`` for the view the caller names (the CLI passes the default view,
``histcode.features.registry.default_view``, or ``--view``). Each Lance table is read as of the last complete
ledger commit (``histcode.store.agreement``), checked against the ledger: a table the ledger needs but that is
missing or short is left out, and a query that names it is answered with what is wrong. Vectors are ``FLOAT[d]``,
so ``array_cosine_distance`` works in SQL. Only SELECT (and EXPLAIN) statements run; the catalog is attached
read-only, and the session cannot reach files or change its own configuration.

Every query runs under limits (``SqlLimits``) set before the configuration is locked: a time limit, as Datasette's
``sql_time_limit_ms`` (a timer thread calls ``interrupt`` on the connection, so a runaway cross join ends within
it), a memory limit and a thread count (DuckDB's own default is 80% of the machine's memory and every core), and
no temporary directory, so a query that needs more memory fails with a reason instead of writing to disk.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from histcode.errors import HistcodeError, UsageError
from histcode.store.agreement import StoresDisagree, check_table, ledgers, recorded_versions
from histcode.store.backup import damaged, is_damage
from histcode.store.catalog import Catalog, CatalogError
from histcode.store.patient_predictions import CURRENT_PATIENT_SQL
from histcode.store.predictions import CURRENT_SQL
from histcode.store.vectors import connect
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

ALLOWED = ("SELECT", "EXPLAIN")


class QueryError(HistcodeError, ValueError):
    """A query DuckDB refused (a syntax error, an unknown table or column); the message is DuckDB's, prefixed
    with its kind (``BinderException: ...``)."""


class ReadOnlyQueryError(QueryError):
    """A statement that would write or change the session; the message names it."""


class QueryLimitError(QueryError):
    """A query that ran past its time or memory limit; the message says which and how to raise it."""


MEMORY = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


@dataclass(frozen=True)
class SqlLimits:
    """What one query may use. ``time_limit_s``: seconds before it is interrupted (``histcode sql --time-limit``);
    ``memory_limit``: DuckDB's ``memory_limit`` (``--memory-limit``, e.g. ``4GB``); ``threads``: DuckDB's worker
    threads (``--threads``; default: the cores, at most 4). Lance's own scan threads are outside these."""

    time_limit_s: float = 30.0
    memory_limit: str = "4GB"
    threads: int = 0  # 0: min(4, cores)

    def __post_init__(self) -> None:
        if not self.time_limit_s > 0:
            raise UsageError(f"SQL time limit {self.time_limit_s!r}: give a number of seconds above 0")
        if not MEMORY.match(str(self.memory_limit).strip()):
            raise UsageError(f"SQL memory limit {self.memory_limit!r}: give a size such as 512MB or 4GB")
        if self.threads < 0:
            raise UsageError(f"SQL threads {self.threads}: give 1 or more (0: the cores, at most 4)")

    @property
    def thread_count(self) -> int:
        return self.threads or max(1, min(4, os.cpu_count() or 1))


def _apply(con: duckdb.DuckDBPyConnection, limits: SqlLimits) -> None:
    """The limits, then the lock: once ``lock_configuration`` is set, a query cannot raise them."""
    con.execute(f"SET memory_limit = '{limits.memory_limit.strip()}'")  # checked against MEMORY: no quote in it
    con.execute(f"SET threads = {int(limits.thread_count)}")
    con.execute("SET temp_directory = ''")  # nothing spilled to disk: a read-only session writes nothing
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def sql_literal(text: str) -> str:
    """``text`` as a SQL string literal (quotes doubled): a workspace path may hold a ``'``."""
    return "'" + text.replace("'", "''") + "'"


def check_read_only(query: str) -> None:
    """Refuse anything but SELECT and EXPLAIN, statement by statement."""
    parser = duckdb.connect()
    try:
        statements = parser.extract_statements(query)
    except duckdb.Error as exc:
        raise ReadOnlyQueryError(f"cannot parse the query: {exc}") from exc
    finally:
        parser.close()
    if not statements:
        raise ReadOnlyQueryError("empty query")
    for st in statements:
        kind = st.type.name
        if kind not in ALLOWED:
            raise ReadOnlyQueryError(
                f"{kind} statements are refused: `histcode sql` is read-only (SELECT and EXPLAIN only); "
                "change the store through histcode commands"
            )


def open_session(ws: Workspace, default_view: str | None = None,
                 limits: SqlLimits | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB session with the catalog attached read-only and the Lance tables registered (as of
    the last ledger commit); ``default_view``'s tables also as ``tile_embeddings`` / ``slide_embeddings``;
    ``limits`` (default ``SqlLimits()``) set and the configuration locked."""
    return _session(ws, default_view, limits)[0]


def _session(ws: Workspace, default_view: str | None,
             limits: SqlLimits | None) -> tuple[duckdb.DuckDBPyConnection, dict[str, StoresDisagree]]:
    """``open_session``'s connection, and the tables left out because they disagree with the ledger: {name the
    query would use: why}."""
    catalog = Catalog.of(ws)
    if not catalog.path.exists():
        raise CatalogError(f"no catalog at {catalog.path}: run `histcode ingest` first")
    with catalog.connect(read_only=True):
        pass  # upgrades a catalog written by an older histcode before it is attached read-only
    con = duckdb.connect()
    try:
        con.execute(f"ATTACH {sql_literal(str(catalog.path))} AS catalog (READ_ONLY)")
    except duckdb.IOException as exc:
        con.close()
        if is_damage(exc):
            raise damaged(catalog.path, exc) from exc
        raise CatalogError(f"cannot open {catalog.path} read-only: {exc} (a histcode command is writing to it?)") from exc
    try:
        unavailable = _attach_views(con, ws, default_view)
    except duckdb.Error as exc:
        con.close()
        if is_damage(exc):
            raise damaged(catalog.path, exc) from exc
        raise
    _apply(con, limits or SqlLimits())
    return con, unavailable


def _attach_views(con: duckdb.DuckDBPyConnection, ws: Workspace, default_view: str | None) -> dict[str, StoresDisagree]:
    """The catalog's tables and views, and every materialised view's Lance tables, into the session."""
    tables = [name for (name,) in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = 'catalog'").fetchall()]
    for name in tables:
        con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM catalog.main."{name}"')
    if "predictions" in tables:
        con.execute(f"CREATE VIEW current_predictions AS {CURRENT_SQL.format(table='catalog.main.predictions')}")
    if "patient_predictions" in tables:
        con.execute("CREATE VIEW current_patient_predictions AS "
                    f"{CURRENT_PATIENT_SQL.format(table='catalog.main.patient_predictions')}")
    views = con.execute(
        "SELECT view_id, kind, lance_table FROM catalog.main.feature_views "
        "WHERE status IN ('ok', 'partial') ORDER BY updated_at DESC"
    ).fetchall()
    unavailable: dict[str, StoresDisagree] = {}
    if not views:
        return unavailable
    execute = lambda q: con.execute(q).fetchall()  # noqa: E731
    ledger, pinned = ledgers(execute, "catalog.main."), recorded_versions(execute, "catalog.main.")
    local_and_gone = "://" not in ws.lancedb_uri and not ws.lancedb_dir.exists()
    db = None if local_and_gone else connect(ws.lancedb_uri)
    for view_id, kind, lance_table in views:
        names = [lance_table] + ([f"{kind}_embeddings"] if view_id == default_view else [])
        dataset, problem = check_table(db, view_id, kind, lance_table, ledger.get(view_id, {}), pinned.get(lance_table))
        if problem is not None:
            unavailable.update({name: problem.error() for name in names})
            continue
        if dataset is not None:
            for name in names:
                con.register(name, dataset)
    return unavailable


def _limit_error(exc: duckdb.Error, limits: SqlLimits) -> QueryLimitError | None:
    if isinstance(exc, duckdb.InterruptException):
        return QueryLimitError(f"the query ran past its time limit of {limits.time_limit_s:g} s and was stopped; "
                               "narrow it (a WHERE, a LIMIT, no cross join) or raise the limit (`histcode sql "
                               "--time-limit SECONDS`, run_sql's limits=SqlLimits(time_limit_s=...))")
    if isinstance(exc, duckdb.OutOfMemoryException):
        first = str(exc).strip().splitlines()[0]
        return QueryLimitError(f"the query ran past its memory limit of {limits.memory_limit} ({first}); narrow it "
                               "or raise the limit (`histcode sql --memory-limit 8GB`, run_sql's "
                               "limits=SqlLimits(memory_limit=...))")
    return None


def run_sql(ws: Workspace, query: str, default_view: str | None = None, limits: SqlLimits | None = None) -> pa.Table:
    """The result of one read-only ``query`` (see ``check_read_only``), run under ``limits`` (default
    ``SqlLimits()``): QueryLimitError when it runs past one, QueryError with DuckDB's message otherwise."""
    limits = limits or SqlLimits()
    check_read_only(query)
    con, unavailable = _session(ws, default_view, limits)
    timer = threading.Timer(limits.time_limit_s, con.interrupt)
    timer.daemon = True
    timer.start()
    try:
        return con.sql(query).to_arrow_table()
    except duckdb.Error as exc:
        missing = re.search(r"Table with name (\S+) does not exist", str(exc))
        if missing and missing.group(1) in unavailable:  # a view's table the ledger needs: say what is wrong with it
            raise unavailable[missing.group(1)] from exc
        if is_damage(exc):
            raise damaged(Catalog.of(ws).path, exc) from exc
        raise (_limit_error(exc, limits) or QueryError(f"{type(exc).__name__}: {exc}")) from exc
    finally:
        timer.cancel()
        timer.join()  # an interrupt already under way ends before the connection does
        con.close()
