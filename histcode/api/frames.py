"""Tables out of the API in the format a caller asks for (Arrow, pandas or polars), and the filters that select
their rows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import pyarrow as pa

from histcode.errors import HistcodeError, require
from histcode.store.vectors import key_filter

Format = Literal["arrow", "pandas", "polars"]
FORMATS = ("arrow", "pandas", "polars")


class FilterError(HistcodeError, ValueError):
    """A ``where`` filter or a column list that a feature view's table cannot answer; the message names the
    table, the filter and the columns it has."""


def check_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt  # type: ignore[return-value]


def convert(table: pa.Table | pa.RecordBatch, fmt: Format):
    """``table`` as ``fmt``: a pyarrow Table (or RecordBatch) as it is, a pandas DataFrame (vectors become one
    numpy array per row) or a polars DataFrame (vectors an Array column)."""
    check_format(fmt)
    if fmt == "arrow":
        return table
    if fmt == "pandas":
        return table.to_pandas()
    polars = require("polars", "polars", "format='polars'")
    return polars.from_arrow(table)


def converted(batches: Iterable[pa.RecordBatch], fmt: Format) -> Iterator:
    for batch in batches:
        yield convert(batch, fmt)


def row_filter(where: str | None, column: str | None = None, ids: Sequence[str] | None = None) -> str | None:
    """One Lance filter: ``where`` (SQL over the table's columns) and, when ``ids`` are given, ``column IN ids``."""
    parts = []
    if ids is not None:
        ids = list(ids)
        parts.append(key_filter(column, ids) if ids else "false")
    if where:
        parts.append(f"({where})" if parts else where)
    return " AND ".join(parts) or None


def check_columns(schema: pa.Schema, columns: Sequence[str] | None, table: str) -> list[str] | None:
    if columns is None:
        return None
    unknown = [c for c in columns if c not in schema.names]
    if unknown:
        raise FilterError(f"{table} has no column {', '.join(map(repr, unknown))} (columns: {', '.join(schema.names)})")
    return list(columns)


@contextmanager
def filter_errors(dataset, table: str, where: str | None) -> Iterator[None]:
    """Lance's errors for a bad filter told with the table's columns rather than Lance's internals (hidden
    columns, source paths)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 -- lance reports a bad filter as ValueError, OSError or its own types
        text = str(exc).strip()
        first = text.split(". Valid fields")[0].split(", /")[0].splitlines()[0] if text else type(exc).__name__
        visible = ", ".join(n for n in dataset.schema.names)
        raise FilterError(f"cannot filter {table} by {where!r}: {first} (columns: {visible})") from exc


def read_table(dataset, table: str, columns: Sequence[str] | None, where: str | None) -> pa.Table:
    columns = check_columns(dataset.schema, columns, table)
    with filter_errors(dataset, table, where):
        return dataset.to_table(columns=columns, filter=where)


def read_batches(dataset, table: str, columns: Sequence[str] | None, where: str | None,
                 batch_size: int) -> Iterator[pa.RecordBatch]:
    """The rows in batches of at most ``batch_size``; a bad filter is told before the first batch."""
    columns = check_columns(dataset.schema, columns, table)
    with filter_errors(dataset, table, where):
        reader = dataset.scanner(columns=columns, filter=where, batch_size=batch_size).to_reader()
    return iter(reader)
