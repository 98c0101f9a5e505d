"""A workspace's MLflow store follows the workspace when it is copied or moved.

MLflow's SQLite store records absolute artifact locations (experiments, runs, logged models, model versions),
so a copied workspace would keep writing artifacts into the original's folder and read the original's files.
Before a HistCode process uses a local store it checks where the store's experiments point; if they point
into another workspace's ``mlruns/artifacts``, every recorded location under that old root is rewritten to
this workspace's, in one SQLite transaction. The artifacts themselves were copied with the workspace.

Only commands that write relocate. A reader that must not write (the viewer: ``Tracker(ws, read_only=True)``)
reads ``ReadOnlyStore``: a private copy of the store, taken with SQLite's backup API from the store opened
read-only, kept outside the workspace and relocated there, so a copied workspace's models are found in its own
artifacts and neither ``mlflow.db`` nor any other file of the workspace is touched (a read-only workspace is
read as well). The copy is taken again when the store changes.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import tempfile
import threading
import time
import weakref
from pathlib import Path
from urllib.parse import quote

from histcode.runtime import file_stamps

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


class NoTrackingStore(LookupError):
    """A read-only tracker over a workspace that has no MLflow store (a reader never creates one)."""


def _stamp(db_path: Path) -> tuple:
    return file_stamps((db_path, db_path.with_name(db_path.name + "-wal"), db_path.with_name(db_path.name + "-journal")))


class ReadOnlyStore:
    """A local MLflow store read without a write to it or beside it: MLflow reads a private copy (``uri``), kept
    in a temporary folder outside the workspace, whose artifact locations point into ``root_uri`` (the
    workspace's ``mlruns/artifacts``), taken again when the store's files change (a ``stat`` at most every
    ``check_every_s``). The folder is removed when the object goes or the process exits."""

    def __init__(self, db_path: Path, root_uri: str, check_every_s: float = 1.0) -> None:
        self.db_path, self.root_uri, self.check_every_s = Path(db_path), root_uri, check_every_s
        self._lock = threading.Lock()
        self._dir: Path | None = None
        self._stamp: tuple | None = None
        self._checked = 0.0

    @property
    def copy_path(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="histcode-mlflow-readonly-"))
            weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        return self._dir / "mlflow.db"

    @property
    def uri(self) -> str:
        """The copy's SQLAlchemy URI, the copy brought up to date first if the store changed."""
        self.refresh()
        return f"sqlite:///{self.copy_path}"

    def refresh(self) -> bool:
        """Copy and relocate the store again if its files changed since the last copy; whether it did."""
        with self._lock:
            now = time.monotonic()
            if self._stamp is not None and now - self._checked < self.check_every_s:
                return False
            self._checked = now
            if not self.db_path.is_file():
                raise NoTrackingStore(f"no MLflow store at {self.db_path} (a read-only reader does not create one)")
            stamp = _stamp(self.db_path)
            if stamp == self._stamp:
                return False
            self._copy()
            relocated = relocate_store(self.copy_path, self.root_uri)
            self._stamp = stamp
            log.debug("read-only copy of %s taken (%d artifact locations pointed into %s)", self.db_path, relocated,
                      self.root_uri)
            return True

    def _copy(self) -> None:
        try:
            source = sqlite3.connect(f"file:{quote(str(self.db_path))}?mode=ro", uri=True, timeout=30)
            self._backup(source)  # a consistent copy, even while a command writes the store
        except sqlite3.Error as exc:  # e.g. a journal left by a killed writer, which a read-only open cannot roll back
            log.info("cannot back up %s read-only (%s): copying its files first", self.db_path, exc)
            raw = self.copy_path.parent / "raw"
            shutil.rmtree(raw, ignore_errors=True)
            raw.mkdir()
            for suffix in ("", "-journal", "-wal"):
                src = self.db_path.with_name(self.db_path.name + suffix)
                if src.is_file():
                    shutil.copyfile(src, raw / (self.db_path.name + suffix))
            self._backup(sqlite3.connect(raw / self.db_path.name, timeout=30))  # the copy rolls its journal back
            shutil.rmtree(raw, ignore_errors=True)

    def _backup(self, source: sqlite3.Connection) -> None:
        """``source`` backed up into the copy in place (MLflow's open connections to it see the new content)."""
        target = sqlite3.connect(self.copy_path, timeout=30)
        try:
            source.backup(target)
        finally:
            target.close()
            source.close()
