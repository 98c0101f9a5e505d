"""The catalog's ``predictions`` table: which head version predicted what for which slide, and whether that is
still the head the registry serves.

One row per (slide, head version, source, output). ``source`` is ``predict`` (the registered head applied by
`histcode predict`) or ``cv`` (out of fold: the cross-validation's fold model that never saw the slide's
patient, written by `histcode heads` for every version it registers). Outputs are named as
``histcode.heads.outputs`` names them (``p_tumor``, ``p_luad``, ``de_EGFR``, ...): ``value`` the number, ``call``
the class. A row is ``stale`` when its task's ``@best`` version is another one now; the view ``current_predictions``
keeps one row per (slide, output): a fresh row before a stale one, an out-of-fold row before a prediction (a slide
with out-of-fold rows was trained on, so the registered head's prediction of it is in-sample), the newest first.

Writes replace a (slide, model, version, source)'s rows in one transaction, so a reader sees the old rows or the
new ones, never half.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import pandas as pd

from histcode.store.catalog import Catalog
from histcode.store.records import utcnow

log = logging.getLogger(__name__)

PREDICT, CV = "predict", "cv"

COLUMNS = ("slide_id", "task", "model", "version", "aggregator", "view_id", "source", "fold", "output", "value",
           "call", "in_distribution", "ood_score", "ood_percentile", "stale", "predicted_at")

# the row each (slide, output) is shown with (over a table or view named {table}); CURRENT_TEMPLATE keeps the
# unit's column open ({key}) for the per-patient table
CURRENT_TEMPLATE = """
    SELECT * EXCLUDE (_rank) FROM (
        SELECT *, row_number() OVER (PARTITION BY {key}, output
                                     ORDER BY stale, source = 'predict', predicted_at DESC, version DESC) AS _rank
        FROM {table}) WHERE _rank = 1"""
CURRENT_SQL = CURRENT_TEMPLATE.replace("{key}", "slide_id")


def write_predictions(catalog: Catalog, frame: pd.DataFrame, current: Mapping[str, int] | None = None) -> int:
    """Store ``frame``'s rows (``COLUMNS`` but ``stale`` and ``predicted_at``, which are set here), replacing what
    the same (slide, model, version, source) had; then, with ``current`` (task -> the version ``@best`` names
    now), mark every other version's rows of those tasks stale. Returns the rows written."""
    return write_rows(catalog, "predictions", "slide_id", COLUMNS, frame, current)


def write_rows(catalog: Catalog, table: str, key: str, columns: Iterable[str], frame: pd.DataFrame,
               current: Mapping[str, int] | None = None) -> int:
    """``write_predictions`` for a table of the same shape whose unit (slide, patient) is the column ``key``."""
    if frame.empty and not current:
        return 0
    columns = list(columns)
    frame = frame.assign(stale=False, predicted_at=utcnow()) if len(frame) else frame
    with catalog.transaction() as con:
        if len(frame):
            keys = frame[[key, "model", "version", "source"]].drop_duplicates()
            con.register("_keys", keys)
            con.execute(f"DELETE FROM {table} p USING _keys k WHERE p.{key} = k.{key} AND p.model = k.model "
                        "AND p.version = k.version AND p.source = k.source")
            con.unregister("_keys")
            for col in columns:
                if col not in frame:
                    frame[col] = None
            con.register("_rows", frame[columns])
            cols = ", ".join(f'"{c}"' for c in columns)
            con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _rows")
            con.unregister("_rows")
        for task, version in (current or {}).items():
            con.execute(f"UPDATE {table} SET stale = (version != ?) WHERE task = ? AND stale != (version != ?)",
                        [int(version), task, int(version)])
    return len(frame)


def mark_stale(catalog: Catalog, current: Mapping[str, int]) -> None:
    """Rows of each task whose version is not ``current[task]`` (what ``@best`` names now) become stale, and rows
    of that version fresh again."""
    if current and catalog.path.exists():
        write_predictions(catalog, pd.DataFrame(), current)


def stale_slides(catalog: Catalog, slide_ids: Iterable[str] | None = None) -> list[str]:
    """Healthy slides that ``histcode predict --refresh`` recomputes: those whose `histcode predict` rows of some task
    are all stale (a newer head version is registered), and the inference cohorts' slides that have no rows."""
    rows = catalog.query(
        f"""SELECT slide_id FROM (
                SELECT slide_id FROM predictions WHERE source = '{PREDICT}' GROUP BY slide_id, task HAVING bool_and(stale)
                UNION
                SELECT s.slide_id FROM slides s JOIN cohorts c ON c.cohort = s.cohort WHERE c.role = 'inference'
                AND s.slide_id NOT IN (SELECT slide_id FROM predictions WHERE source = '{PREDICT}'))
            WHERE slide_id IN (SELECT slide_id FROM slides WHERE status = 'ok') ORDER BY slide_id""")
    found = list(dict.fromkeys(r["slide_id"] for r in rows))
    if slide_ids is not None:
        wanted = set(slide_ids)
        found = [s for s in found if s in wanted]
    return found


__all__ = ["COLUMNS", "CURRENT_SQL", "CV", "PREDICT", "mark_stale", "stale_slides", "write_predictions"]
