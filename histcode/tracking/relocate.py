"""A workspace's MLflow store follows the workspace when it is copied or moved.

MLflow's SQLite store records absolute artifact locations (experiments, runs, logged models, model versions),
so a copied workspace would keep writing artifacts into the original's folder and read the original's files.
Before a HistCode process uses a local store it checks where the store's experiments point; if they point
into another workspace's ``mlruns/artifacts``, every recorded location under that old root is rewritten to
this workspace's, in one SQLite transaction. The artifacts themselves were copied with the workspace.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

# (table, column) pairs in MLflow 3's schema that hold artifact locations
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def _columns(con: sqlite3.Connection) -> list[tuple[str, str]]:
    present = []
    for table, column in LOCATION_COLUMNS:
        cols = {r[1] for r in con.execute(f"PRAGMA table_info({table})").fetchall()}
        if column in cols:
            present.append((table, column))
    return present


def foreign_roots(con: sqlite3.Connection, root_uri: str) -> set[str]:
    """Artifact roots of other workspaces that this store's experiments point into: an experiment HistCode
    created has the location ``<root>/<experiment name>``."""
    roots = set()
    for name, location in con.execute("SELECT name, artifact_location FROM experiments").fetchall():
        if not location or not location.startswith("file:"):
            continue
        suffix = "/" + name
        if location.endswith(suffix) and location[: -len(suffix)].endswith("/mlruns/artifacts"):
            old = location[: -len(suffix)]
            if old != root_uri:
                roots.add(old)
    return roots


def relocate_store(db_path: Path, root_uri: str) -> int:
    """Rewrite the artifact locations of a copied or moved store to ``root_uri`` (this workspace's
    ``mlruns/artifacts`` as a file URI). MLflow's own ``Default`` experiment, which it creates with the
    process's current directory as its location, is pointed into the workspace too. Returns the number of rows
    changed (0: nothing to do)."""
    if not db_path.is_file():
        return 0
    con = sqlite3.connect(db_path, timeout=30)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
        if "experiments" not in tables:
            return 0
        default, changed = f"{root_uri}/Default", 0
        located = con.execute("SELECT artifact_location FROM experiments WHERE name = 'Default'").fetchall()
        if located and located[0][0] != default:  # read first: no write transaction on every use
            with con:
                changed = con.execute("UPDATE experiments SET artifact_location = ? WHERE name = 'Default'",
                                      [default]).rowcount
        olds = foreign_roots(con, root_uri)
        if not olds:
            return changed
        with con:  # one transaction
            for old in sorted(olds):
                for table, column in _columns(con):
                    for prefix_old, prefix_new in ((old, root_uri), (old.removeprefix("file://"), root_uri.removeprefix("file://"))):
                        cur = con.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                            [prefix_new, len(prefix_old) + 1, len(prefix_old), prefix_old])
                        changed += cur.rowcount
        log.info("MLflow store %s was copied or moved: %d artifact locations now point into %s (were %s)",
                 db_path, changed, root_uri, ", ".join(sorted(olds)))
        return changed
    finally:
        con.close()
