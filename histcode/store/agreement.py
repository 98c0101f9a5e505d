"""The catalog's ledger and the vector tables, checked against each other.

The ledger (``materializations``) says which slides a feature view holds and how many tile vectors each has; the
view's Lance tables hold the vectors. A step writes the vectors first and the ledger second, and records each
table's version in ``vector_versions`` in the ledger's own transaction, so that version is the last one whose
every row the ledger vouches for. Readers (``histcode sql``, search) read that version (``committed_dataset``):
vectors of a step whose ledger commit never happened (killed, or a disk that filled in between) stay unseen, and
the view keeps serving what it served before.

``check_table`` compares a table with the ledger: a table that is missing while the ledger calls slides
materialised, a recorded version the table no longer has (replaced, restored from an older copy), fewer rows than
the ledger records, and, in a full check (``histcode embed --recheck``), rows per slide. Each disagreement is
named with the slides whose vectors are missing, which `histcode embed` then embeds again; a fresh table is never
taken for an empty view while the ledger says otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow.compute as pc

from histcode.store.records import utcnow
from histcode.store.vectors import TILE_KIND, VectorStoreError, table_names

log = logging.getLogger(__name__)

REPAIR = "run `histcode embed` to embed them again (`histcode embed --recheck` checks every slide), or restore data/lancedb"


class StoresDisagree(VectorStoreError):
    """A view's vector table does not hold what the catalog's ledger records; the message names the table, what
    differs and how to repair it."""


@dataclass(frozen=True)
class Disagreement:
    view_id: str
    kind: str
    table: str
    problem: str
    slides: tuple[str, ...]  # the slides whose vectors are missing or short: what a repair embeds again

    def __str__(self) -> str:
        return f"view {self.view_id}: {self.problem}"

    def error(self) -> StoresDisagree:
        return StoresDisagree(f"{self}; {REPAIR}")


Execute = Callable[[str], list[tuple]]


def ledgers(execute: Execute, prefix: str = "") -> dict[str, dict[str, int]]:
    """view id -> {slide id: tile vectors} of the slides the ledger records as materialised. ``execute`` runs
    a query on the catalog (``prefix``: how its tables are named there, e.g. ``catalog.main.``)."""
    out: dict[str, dict[str, int]] = {}
    for view_id, slide_id, rows in execute(f"SELECT view_id, slide_id, rows FROM {prefix}materializations "
                                           "WHERE status = 'ok'"):
        out.setdefault(view_id, {})[slide_id] = int(rows or 0)
    return out


def recorded_versions(execute: Execute, prefix: str = "") -> dict[str, int]:
    """Lance table name -> its version at the last ledger commit (none for a catalog from before they were kept)."""
    try:
        return {name: int(v) for name, v in execute(f"SELECT lance_table, version FROM {prefix}vector_versions")}
    except Exception:  # noqa: BLE001 -- a catalog attached read-only from before the table (DuckDB's CatalogException)
        return {}


def catalog_state(catalog) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """(``ledgers``, ``recorded_versions``) of a ``histcode.store.catalog.Catalog``."""
    execute = lambda q: [tuple(r.values()) for r in catalog.query(q)]  # noqa: E731
    return ledgers(execute), recorded_versions(execute)


def record_versions(con, view_id: str, tables: dict) -> None:
    """Record ``{kind: lance table}``'s current versions as the view's committed ones, in the caller's
    transaction (the ledger's)."""
    now = utcnow()
    for kind, table in tables.items():
        con.execute("INSERT OR REPLACE INTO vector_versions VALUES (?, ?, ?, ?, ?)",
                    [table.name, view_id, kind, int(table.version), now])


def update_versions(con, versions: dict[str, int]) -> None:
    """Move the recorded versions of these tables (those that have one) to ``versions``, in the caller's
    transaction: a step that removed rows the ledger no longer records (a slide whose pixels changed)."""
    for name, version in versions.items():
        con.execute("UPDATE vector_versions SET version = ?, recorded_at = ? WHERE lance_table = ?",
                    [int(version), utcnow(), name])


def forget_versions(con, names: list[str]) -> None:
    """Drop the recorded versions of tables that are made anew (their old history is gone)."""
    for name in names:
        con.execute("DELETE FROM vector_versions WHERE lance_table = ?", [name])


def slide_rows(dataset) -> dict[str, int]:
    """Rows per slide of a Lance dataset, streamed over its ``slide_id`` column (never the vectors)."""
    counts: dict[str, int] = {}
    for batch in dataset.scanner(columns=["slide_id"]).to_batches():
        for item in pc.value_counts(batch.column("slide_id")).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


def _expected(kind: str, ledger: dict[str, int]) -> int:
    return sum(ledger.values()) if kind == TILE_KIND else len(ledger)


def _what(ledger: dict[str, int]) -> str:
    return f"{len(ledger)} slides ({sum(ledger.values())} tile vectors)"


def check_table(db, view_id: str, kind: str, name: str, ledger: dict[str, int], version: int | None = None,
                full: bool = False):
    """(the table's Lance dataset, at ``version`` when it has it, else at its latest; None when missing) and
    the disagreement with ``ledger`` ({slide: tile vectors}), or None. ``db``: the LanceDB connection (None: there
    is no vector store at all). A recorded version the table lacks is forgiven when the latest version holds
    every row the ledger records. ``full``: count rows per slide even when the totals agree."""
    if db is None or name not in set(table_names(db)):
        if not ledger:
            return None, None
        return None, Disagreement(view_id, kind, name, f"table {name} is missing, but the ledger records "
                                  f"{_what(ledger)} as materialised", tuple(sorted(ledger)))
    dataset = db.open_table(name).to_lance()
    latest, stale = dataset.version, None
    if version is not None and version != latest:
        try:
            if version > latest:
                raise ValueError(version)
            dataset = dataset.checkout_version(version)
        except (OSError, ValueError):
            stale = (f"table {name} has no version {version}, the one recorded at the last ledger commit (its "
                     f"latest is {latest}: the table was replaced, restored from an older copy, or pruned)")
    if not ledger:
        return dataset, None
    counted, expected = dataset.count_rows(), _expected(kind, ledger)
    if counted >= expected and not full and stale is None:
        if counted > expected:
            log.debug("%s: %d rows, %d of slides the ledger records", name, counted, expected)
        return dataset, None
    counts = slide_rows(dataset)
    short = tuple(sorted(s for s, n in ledger.items() if counts.get(s, 0) != (n if kind == TILE_KIND else 1)))
    if not short:
        if stale is not None:
            log.warning("%s; its latest version holds every row the ledger records: reading that", stale)
        return dataset, None
    listed = ", ".join(short[:3]) + (f" and {len(short) - 3} more" if len(short) > 3 else "")
    problem = (f"table {name} holds {counted} rows, but the ledger records {_what(ledger)}: {len(short)} slides "
               f"differ ({listed})")
    return dataset, Disagreement(view_id, kind, name, f"{stale}; {problem}" if stale else problem, short)


def committed_dataset(db, view_id: str, kind: str, name: str, ledger: dict[str, int], version: int | None):
    """The table as of the last ledger commit, checked against the ledger: StoresDisagree naming what is wrong
    when it is missing or short; None for a table that does not exist for a view with nothing materialised."""
    dataset, problem = check_table(db, view_id, kind, name, ledger, version)
    if problem is not None:
        raise problem.error()
    return dataset
