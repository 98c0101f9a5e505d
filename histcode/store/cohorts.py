"""Cohorts in the catalog: named groups of slides with a role, training (pretraining, labels and heads read
them) or inference (registered by `histcode predict`, embedded and scored, never trained on). A mixin of
``histcode.store.catalog.Catalog``, whose connections, transactions and queries it uses."""

from __future__ import annotations

import duckdb

from histcode.errors import HistcodeError
from histcode.store.records import INFERENCE, TRAINING, utcnow


class CatalogError(HistcodeError, RuntimeError):
    """The catalog could not be opened or written; the message says which file and why."""


class CohortRegistry:
    def put_cohort(self, cohort: str, role: str = TRAINING) -> None:
        """Register a cohort; refuses to change the role of an existing one."""
        if role not in (TRAINING, INFERENCE):
            raise ValueError(f"cohort role must be {TRAINING!r} or {INFERENCE!r}, not {role!r}")
        with self.transaction() as con:
            self._ensure_cohort(con, cohort, role)

    @staticmethod
    def _ensure_cohort(con: duckdb.DuckDBPyConnection, cohort: str, role: str | None) -> None:
        found = con.execute("SELECT role FROM cohorts WHERE cohort = ?", [cohort]).fetchall()
        if found and role is not None and found[0][0] != role:
            raise CatalogError(f"cohort {cohort!r} is a {found[0][0]} cohort; slides for {role} need a cohort of "
                               f"their own (another --cohort name)")
        if not found:
            con.execute("INSERT INTO cohorts VALUES (?, ?, ?)", [cohort, role or TRAINING, utcnow()])

    def move_slides(self, slide_ids: list[str], cohort: str, role: str | None = None) -> None:
        """Put registered slides into ``cohort`` (created with ``role``, default training, if new), in one
        transaction; their pixels, tiles and vectors stay as they are. Unknown ids: CatalogError, nothing moved."""
        with self.transaction() as con:
            known = {r[0] for r in con.execute("SELECT slide_id FROM slides").fetchall()}
            unknown = sorted(set(slide_ids) - known)
            if unknown:
                raise CatalogError(f"no such slides: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
            self._ensure_cohort(con, cohort, role)
            for sid in slide_ids:
                con.execute("UPDATE slides SET cohort = ?, updated_at = ? WHERE slide_id = ?", [cohort, utcnow(), sid])

    def cohort_counts(self) -> list[dict]:
        """Every cohort with its role and its slides (healthy, tiled under any spec)."""
        return self.query(
            """SELECT c.cohort, c.role, count(s.slide_id) AS slides, count(s.slide_id) FILTER (s.status = 'ok') AS ok
               FROM cohorts c LEFT JOIN slides s ON s.cohort = c.cohort GROUP BY ALL ORDER BY c.cohort""")

    def cohorts(self) -> dict[str, str]:
        """cohort -> role."""
        return {r["cohort"]: r["role"] for r in self.query("SELECT cohort, role FROM cohorts ORDER BY cohort")}

    def training_cohorts(self, requested: tuple[str, ...] | list[str] = ()) -> list[str]:
        """The cohorts that pretraining, labels and heads read: ``requested`` (checked), or every training
        cohort. An inference cohort (`histcode predict`'s) is never one of them."""
        known = self.cohorts()
        if not requested:
            return sorted(c for c, role in known.items() if role == TRAINING)
        unknown = [c for c in requested if c not in known]
        if unknown:
            raise CatalogError(f"cohorts.train names cohorts that hold no slides: {unknown} (cohorts: "
                               f"{', '.join(f'{c} ({r})' for c, r in known.items()) or 'none'})")
        inference = [c for c in requested if known[c] != TRAINING]
        if inference:
            raise CatalogError(f"cohorts.train names inference cohorts {inference}: slides registered by "
                               "`histcode predict` are never trained on")
        return list(requested)
