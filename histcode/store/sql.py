"""Read-only SQL over the whole store: the DuckDB catalog and every feature view's Lance tables.

Names: the catalog's tables (``slides``, ``tiles``, ``tilings``, ``feature_views``, ...), each view's tables as
``tile_emb__<view>`` / ``slide_emb__<view>`` (dashes in the view id become underscores), and
``current_predictions`` (the stored prediction each slide's output is shown with, ``histcode.store.predictions``),
``current_patient_predictions`` (the same per patient, ``histcode.store.patient_predictions``),
``tile_embeddings`` / ``slide_embeddings`` for the view the caller names (the CLI passes the default view,
``histcode.features.registry.default_view``, or ``--view``). Vectors are ``FLOAT[d]``,
so ``array_cosine_distance`` works in SQL. Only SELECT (and EXPLAIN) statements run; the catalog is attached
read-only, and the session cannot reach files or change its own configuration.
"""

from __future__ import annotations

import logging

import duckdb
import pyarrow as pa

from histcode.errors import HistcodeError
from histcode.store.catalog import Catalog, CatalogError
from histcode.store.patient_predictions import CURRENT_PATIENT_SQL
from histcode.store.predictions import CURRENT_SQL
from histcode.store.vectors import connect, table_names
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

ALLOWED = ("SELECT", "EXPLAIN")


class QueryError(HistcodeError, ValueError):
    """A query DuckDB refused (a syntax error, an unknown table or column); the message is DuckDB's, prefixed
    with its kind (``BinderException: ...``)."""


class ReadOnlyQueryError(QueryError):
    """A statement that would write or change the session; the message names it."""


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


def open_session(ws: Workspace, default_view: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB session with the catalog attached read-only and the Lance tables registered;
    ``default_view``'s tables also as ``tile_embeddings`` / ``slide_embeddings``."""
    catalog = Catalog.of(ws)
    if not catalog.path.exists():
        raise CatalogError(f"no catalog at {catalog.path}: run `histcode ingest` first")
    with catalog.connect(read_only=True):
        pass  # upgrades a catalog written by an older histcode before it is attached read-only
    con = duckdb.connect()
    try:
        con.execute(f"ATTACH '{catalog.path}' AS catalog (READ_ONLY)")
    except duckdb.IOException as exc:
        con.close()
        raise CatalogError(f"cannot open {catalog.path} read-only: {exc} (a histcode command is writing to it?)") from exc
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
    if views and (ws.lancedb_dir.exists() or "://" in ws.lancedb_uri):
        db = connect(ws.lancedb_uri)
        present = set(table_names(db))
        for view_id, kind, lance_table in views:
            if lance_table not in present:
                continue
            dataset = db.open_table(lance_table).to_lance()
            con.register(lance_table, dataset)
            if view_id == default_view:
                con.register(f"{kind}_embeddings", dataset)
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def run_sql(ws: Workspace, query: str, default_view: str | None = None) -> pa.Table:
    check_read_only(query)
    con = open_session(ws, default_view)
    try:
        return con.sql(query).to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        con.close()
