"""One page of the cohort table as a SQL query over the viewer's copy of the catalog (``histcode.viewer.snapshot``:
its tables and ``current_predictions``, the stored prediction each slide's output is shown with): filter, sort,
offset and limit all in DuckDB, so a page of a cohort of ten thousand slides costs what a page of forty does.

Everything a request brings is a bound parameter or checked against an allow-list (the sort key is a column of
the table or an output the stored predictions have); nothing from a request is spliced into the SQL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from histcode.errors import UsageError

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
MAX_NEEDLE = 200
# sortable columns of the slide table and what they are in SQL
COLUMNS = {"slide_id": "b.slide_id", "patient_id": "b.patient_id", "cohort": "b.cohort", "status": "b.status",
           "mpp": "b.mpp", "n_tiles": "b.n_tiles", "tumor": "b.tumor", "subtype": "b.subtype"}
# text the filter looks in, besides the stored calls
SEARCHED = ("b.slide_id", "b.patient_id", "b.cohort", "b.status", "b.subtype")

BASE = """
    SELECT s.slide_id, s.patient_id, s.cohort, s.status, s.reason, s.mpp_x AS mpp, s.width, s.height, t.n_tiles,
           l.tumor, l.subtype
    FROM slides s
    LEFT JOIN (SELECT slide_id, n_tiles FROM tilings WHERE spec_id = ? AND status = 'ok') t USING (slide_id)
    LEFT JOIN (SELECT slide_id, any_value(tumor) AS tumor, any_value(subtype) AS subtype FROM slide_labels
               GROUP BY slide_id) l USING (slide_id)"""


class CohortQueryError(UsageError):
    """A page request the cohort table cannot answer (an unknown sort key, a bad number); the message says which."""


@dataclass(frozen=True)
class CohortQuery:
    offset: int = 0
    limit: int = DEFAULT_LIMIT
    sort: str = "slide_id"
    desc: bool = False
    q: str = ""  # any text in a row: slide, patient, cohort, status, subtype, a call shown (up, LUSC, ...)
    cohort: str | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> CohortQuery:
        """From a request's query string; ``CohortQueryError`` names a bad value."""
        def number(name: str, default: int) -> int:
            raw = params.get(name)
            if raw in (None, ""):
                return default
            try:
                value = int(raw)
            except ValueError:
                raise CohortQueryError(f"{name} must be an integer, got {raw!r}") from None
            if value < 0:
                raise CohortQueryError(f"{name} must be 0 or more, got {value}")
            return value

        order = params.get("order", "asc")
        if order not in ("asc", "desc"):
            raise CohortQueryError(f"order must be asc or desc, got {order!r}")
        return cls(offset=number("offset", 0), limit=min(max(number("limit", DEFAULT_LIMIT), 1), MAX_LIMIT),
                   sort=params.get("sort") or "slide_id", desc=order == "desc",
                   q=(params.get("q") or "").strip().lower()[:MAX_NEEDLE], cohort=params.get("cohort") or None)

    def sql(self, spec_id: str, outputs: list[str]) -> tuple[str, list]:
        """The page's query and its parameters: rows of ``BASE`` with ``_matched`` (rows the filter keeps)."""
        params: list = [spec_id]
        joins, key = "", None
        if self.sort in COLUMNS:
            key = COLUMNS[self.sort]
        elif self.sort in outputs:
            field = "call" if self.sort.startswith("de_") else "value"
            joins = f" LEFT JOIN (SELECT slide_id, {field} AS _key FROM current_predictions WHERE output = ?) k USING (slide_id)"
            params.append(self.sort)
            key = "k._key"
        else:
            known = ", ".join(list(COLUMNS) + outputs)
            raise CohortQueryError(f"cannot sort by {self.sort!r}; columns: {known}")
        where = []
        if self.cohort:
            where.append("b.cohort = ?")
            params.append(self.cohort)
        if self.q:
            text = " OR ".join(f"contains(lower(coalesce({c}, '')), ?)" for c in SEARCHED)
            calls = "b.slide_id IN (SELECT slide_id FROM current_predictions WHERE contains(lower(call), ?))"
            where.append(f"({text} OR {calls})")
            params += [self.q] * (len(SEARCHED) + 1)
        order = "DESC" if self.desc else "ASC"
        sql = (f"SELECT b.*, count(*) OVER () AS _matched FROM ({BASE}) b{joins}"
               + (f" WHERE {' AND '.join(where)}" if where else "")
               + f" ORDER BY {key} {order} NULLS LAST, b.slide_id LIMIT ? OFFSET ?")
        return sql, params + [self.limit, self.offset]
