"""Which file each imported slide came from, and the SHA-256 of what was imported from it
(``patches.content_digest``): what makes a re-import skip unchanged files.

The view's own ledger (``materializations``) says a slide is done for its current pixels; this table adds the
imported content, so a file re-extracted by the other tool (same name, other vectors) is imported again while an
unchanged one (also copied or re-saved elsewhere) is skipped without a write. It is a table of the catalog's schema
(``histcode.store.schema``); a slide without a row here is simply imported again.
"""

from __future__ import annotations

from histcode.store.catalog import Catalog
from histcode.store.records import utcnow

TABLE = "imported_files"  # histcode.store.schema's TABLES["imported_files"]


def imported_digests(catalog: Catalog, view_id: str) -> dict[str, str]:
    """slide_id -> SHA-256 of the file its rows in ``view_id`` were imported from."""
    rows = catalog.query(f"SELECT slide_id, sha256 FROM {TABLE} WHERE view_id = ?", [view_id])
    return {r["slide_id"]: r["sha256"] for r in rows}


def record_imported(catalog: Catalog, view_id: str, tool: str, rows: list[dict]) -> None:
    """Rows (slide_id, source, sha256, n_tiles), replacing the slides' earlier rows, in one transaction."""
    now = utcnow()
    with catalog.transaction() as con:
        for r in rows:
            con.execute(f"DELETE FROM {TABLE} WHERE view_id = ? AND slide_id = ?", [view_id, r["slide_id"]])
            con.execute(f"INSERT INTO {TABLE} VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [view_id, r["slide_id"], tool, r["source"], r["sha256"], r["n_tiles"], now])
