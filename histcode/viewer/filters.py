"""The viewer's search filters: structured clauses over HTTP, compiled to a Lance filter by HistCode alone.

Over HTTP a search filter is never SQL text. Each clause is one query parameter ``<column>__<op>=<value>``
(Datasette's form), e.g. ``/api/neighbours?tile=T&slide_id__ne=S&subtype__eq=LUAD``; clauses are ANDed. The
column must be one of the searched table's allowed columns (the ids, the tile position and the view's promoted
slide attributes, ``features.attribute_columns``: ``allowed_columns``), the operator one of ``OPERATORS``, and the
value is made a literal here (strings quoted with quotes doubled, integers parsed and range-checked), so no part
of a request becomes SQL. Values, lists and clauses are capped (``MAX_VALUE_CHARS``, ``MAX_LIST_VALUES``,
``MAX_CLAUSES``), and a refusal (``FilterRejected``) names the column or operator and what is allowed, never the
feature store's own errors. A raw ``where=`` is refused with the structured form to use.

The command line keeps ``histcode search --where`` as SQL-like text: whoever runs it owns the machine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from histcode.store.vectors import SLIDE_KIND, TILE_KIND, quote_literal

MAX_CLAUSES = 8
MAX_VALUE_CHARS = 256  # a slide id, a patient id, an attribute value
MAX_LIST_VALUES = 64  # values of one ``in`` / ``notin`` clause
INT64 = (-(2**63), 2**63 - 1)

# op -> (SQL, what the value is): "one" a single value, "list" a comma-separated list or a JSON array, "flag" a boolean
OPERATORS: dict[str, tuple[str, str]] = {
    "eq": ("=", "one"), "ne": ("!=", "one"), "lt": ("<", "one"), "le": ("<=", "one"), "gt": (">", "one"),
    "ge": (">=", "one"), "in": ("IN", "list"), "notin": ("NOT IN", "list"), "isnull": ("IS NULL", "flag"),
}
OPERATOR_LABELS = {"eq": "=", "ne": "≠", "lt": "<", "le": "≤", "gt": ">", "ge": "≥", "in": "one of",
                   "notin": "none of", "isnull": "is empty"}
BASE_COLUMNS = {TILE_KIND: ("tile_id", "slide_id", "patient_id", "x", "y"),
                SLIDE_KIND: ("slide_id", "patient_id", "n_tiles")}
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TRUE, FALSE = {"1", "true", "yes"}, {"0", "false", "no"}


class FilterRejected(ValueError):
    """A filter the viewer does not run; the message is short and says what is allowed."""


@dataclass(frozen=True)
class Clause:
    column: str
    op: str
    value: str


def parse_clauses(params: Iterable[tuple[str, str]]) -> list[Clause]:
    """The filter clauses among a request's query parameters (those named ``<column>__<op>``; the others are the
    route's own and left alone). A parameter ``where`` is refused: raw filters are not taken over HTTP."""
    clauses = []
    for name, value in params:
        if name == "where":
            raise FilterRejected("raw filters (where=...) are not taken over HTTP: give one parameter per clause, "
                                 "<column>__<op>=<value>, e.g. slide_id__ne=X or subtype__eq=LUAD")
        if "__" not in name:
            continue
        column, _, op = name.rpartition("__")
        if op not in OPERATORS:
            raise FilterRejected(f"unknown filter operator {_short(op)!r}: use one of {', '.join(OPERATORS)}")
        if not IDENTIFIER.match(column):
            raise FilterRejected(f"unknown filter column {_short(column)!r}")
        if len(value) > MAX_VALUE_CHARS * (MAX_LIST_VALUES if OPERATORS[op][1] == "list" else 1):
            raise FilterRejected(f"the value of filter {column}__{op} is too long ({len(value)} characters)")
        clauses.append(Clause(column, op, value))
        if len(clauses) > MAX_CLAUSES:
            raise FilterRejected(f"too many filter clauses (at most {MAX_CLAUSES})")
    return clauses


def allowed_columns(schema: pa.Schema, kind: str, attribute_columns: Iterable[str]) -> dict[str, str]:
    """The columns a filter may name on a table of ``kind`` with ``schema``, as name -> "string" | "integer": the
    ids, the tile position (tiles) or tile count (slides) and the view's promoted slide attributes, those the
    table has; never the vectors or anything else."""
    wanted = [*BASE_COLUMNS[kind], *attribute_columns]
    out = {}
    for name in wanted:
        if name in out or not IDENTIFIER.match(name) or name not in schema.names:
            continue
        kind_of = schema.field(name).type
        if pa.types.is_string(kind_of) or pa.types.is_large_string(kind_of):
            out[name] = "string"
        elif pa.types.is_integer(kind_of):
            out[name] = "integer"
    return out


def compile_clauses(clauses: list[Clause], columns: dict[str, str]) -> str | None:
    """The Lance filter of ``clauses`` (ANDed) over ``columns`` (``allowed_columns``); None for no clause."""
    if not clauses:
        return None
    parts = []
    for c in clauses:
        kind = columns.get(c.column)
        if kind is None:
            raise FilterRejected(f"unknown filter column {c.column!r}: filter by one of {', '.join(columns)}")
        sql, arity = OPERATORS[c.op]
        name = f"`{c.column}`"
        if arity == "flag":
            flag = c.value.strip().lower()
            if flag not in TRUE | FALSE:
                raise FilterRejected(f"{c.column}__isnull takes true or false, got {_short(c.value)!r}")
            parts.append(f"{name} IS NULL" if flag in TRUE else f"{name} IS NOT NULL")
        elif arity == "list":
            values = _list(c)
            parts.append(f"{name} {sql} ({', '.join(_literal(c, v, kind) for v in values)})")
        else:
            parts.append(f"{name} {sql} {_literal(c, c.value, kind)}")
    return " AND ".join(parts)


def describe(columns: dict[str, str]) -> dict:
    """What a page shows to build a filter: the columns with their types and the operators."""
    return {"columns": [{"name": n, "type": t} for n, t in columns.items()],
            "operators": [{"op": op, "label": OPERATOR_LABELS[op], "takes": arity} for op, (_, arity) in OPERATORS.items()]}


def _list(c: Clause) -> list[str]:
    text = c.value.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except ValueError:
            raise FilterRejected(f"{c.column}__{c.op} takes a JSON array or comma-separated values") from None
        if not isinstance(values, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            raise FilterRejected(f"{c.column}__{c.op} takes an array of strings or integers")
        values = [str(v) for v in values]
    else:
        values = [v for v in text.split(",")] if text else []
    if not values:
        raise FilterRejected(f"{c.column}__{c.op} needs at least one value")
    if len(values) > MAX_LIST_VALUES:
        raise FilterRejected(f"{c.column}__{c.op} takes at most {MAX_LIST_VALUES} values")
    return values


def _literal(c: Clause, value: str, kind: str) -> str:
    if len(value) > MAX_VALUE_CHARS:
        raise FilterRejected(f"a value of filter {c.column}__{c.op} is too long (at most {MAX_VALUE_CHARS} characters)")
    if kind == "integer":
        text = value.strip()
        if not re.fullmatch(r"[+-]?\d{1,19}", text) or not INT64[0] <= int(text) <= INT64[1]:
            raise FilterRejected(f"{c.column} is an integer column: {_short(value)!r} is not an integer")
        return str(int(text))
    if CONTROL.search(value):
        raise FilterRejected(f"a value of filter {c.column}__{c.op} holds a control character")
    return quote_literal(value)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "…"


__all__ = ["Clause", "FilterRejected", "MAX_CLAUSES", "MAX_LIST_VALUES", "MAX_VALUE_CHARS", "OPERATORS",
           "allowed_columns", "compile_clauses", "describe", "parse_clauses"]
