"""A damaged catalog, told as such, and the backup it can be restored from.

DuckDB's own errors for a catalog file that is truncated or overwritten ("Could not read enough bytes", "not a
valid DuckDB database file", a failed checksum) reach the user as ``CatalogDamaged``: what happened, that nothing
was changed, and how to restore. The backup is ``catalog.duckdb.bak`` beside the catalog, a copy taken after a
command that wrote the catalog finished (``backup_catalog``: only when the catalog changed since the last copy,
only from a catalog that opens and is whole, written to a temporary file and renamed, so a backup is never half a
file and never a copy of a damaged catalog).
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import datetime
from pathlib import Path

import duckdb

from histcode.store.cohorts import CatalogError

log = logging.getLogger(__name__)

BACKUP_SUFFIX = ".bak"
DAMAGE_MARKERS = ("could not read enough bytes", "not a valid duckdb database file", "checksum",
                  "corrupt", "invalid block", "failed to read database header", "is not a database")
DUCKDB_HEADER_BYTES = 3 * 4096  # the file header and the two database headers before the first block


class CatalogDamaged(CatalogError):
    """The catalog file is damaged (truncated, overwritten); the message says so and how to restore it."""


def backup_path(catalog: Path) -> Path:
    return catalog.with_name(catalog.name + BACKUP_SUFFIX)


def is_damage(exc: BaseException) -> bool:
    """Whether a DuckDB error says the database file itself is damaged (not locked, not a bad query)."""
    if isinstance(exc, (CatalogDamaged, duckdb.SerializationException)):
        return True
    storage = (duckdb.IOException, duckdb.InternalException, duckdb.FatalException)  # not a query's own errors
    text = str(exc).lower()
    return isinstance(exc, storage) and "lock" not in text and any(m in text for m in DAMAGE_MARKERS)


def restore_hint(catalog: Path) -> str:
    """How to get a working catalog back: the backup (with its time) when there is one, else DVC or a new one."""
    bak = backup_path(catalog)
    if bak.is_file():
        when = datetime.fromtimestamp(bak.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
        return (f"restore the backup taken after the last command that wrote it ({when}): `cp {bak} {catalog}`, "
                "then rerun the commands run since")
    return "restore it from your own backup or DVC (`dvc checkout`), or ingest again into a new workspace"


def damaged(catalog: Path, exc: BaseException) -> CatalogDamaged:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return CatalogDamaged(f"the catalog {catalog} is damaged ({first}); this command changed nothing in it; "
                          f"{restore_hint(catalog)}")


def whole(path: Path) -> bool:
    """Whether a DuckDB file opens read-only, has HistCode's schema and is at least as long as its blocks in use
    (a truncated file often still opens: its missing blocks fail only when read)."""
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error:
        return False
    try:
        con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        # blocks in use, each somewhere in the file (free blocks past its end are cut off at a checkpoint)
        blocks, block_size = con.execute("SELECT used_blocks, block_size FROM pragma_database_size()").fetchall()[0]
    except duckdb.Error:
        return False
    finally:
        con.close()
    return path.stat().st_size >= DUCKDB_HEADER_BYTES + int(blocks) * int(block_size)


def backup_catalog(catalog: Path) -> Path | None:
    """Copy the catalog to its backup when it changed since the last one and is whole; returns the backup
    written (None: nothing to do, or not possible now: a writer is at work, the catalog is damaged, the disk is
    full; logged, never raised: the command itself succeeded)."""
    bak = backup_path(catalog)
    try:
        source = catalog.stat()
        if Path(str(catalog) + ".wal").exists():
            return None  # a writer is at work (or left a log to replay): the file alone is not the catalog
        if bak.is_file():
            copy = bak.stat()
            if (copy.st_size, copy.st_mtime_ns) == (source.st_size, source.st_mtime_ns):
                return None
        if not whole(catalog):
            log.warning("catalog %s does not open whole: the backup %s is kept as it is", catalog, bak)
            return None
        tmp = bak.with_name(bak.name + f".{os.getpid()}.tmp")
        try:
            shutil.copy2(catalog, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, bak)
        finally:
            tmp.unlink(missing_ok=True)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("no catalog backup written (%s): the previous one, if any, is kept", exc)
        return None
    log.debug("catalog backed up to %s", bak)
    return bak
