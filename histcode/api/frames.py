"""Tables out of the API in the format a caller asks for (Arrow, pandas or polars), and the filters that select
their rows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import pyarrow as pa

from histcode.errors import UsageError, require
from histcode.features.search import FilterError, filter_errors
from histcode.store.vectors import key_filter

Format = Literal["arrow", "pandas", "polars"]
FORMATS = ("arrow", "pandas", "polars")
# batches a stream reads ahead (Lance's default, 16 batches over 4 fragments, holds most of a view in memory)
READAHEAD = 2
IO_BUFFER = 64 << 20  # bytes of reads in flight (Lance's default is 2 GiB)


def check_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
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


def row_filter(where: str | None, **ids: Sequence[str] | None) -> str | None:
    """One Lance filter: ``where`` (SQL over the table's columns) and, for each id column given a list
    (``slide_id=[...]``, ``tile_id=[...]``), ``column IN (...)`` with the ids quoted."""
    parts = []
    for column, values in ids.items():
        if values is not None:
            values = [values] if isinstance(values, str) else list(values)
            parts.append(key_filter(column, values) if values else "false")
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


def read_table(dataset, table: str, columns: Sequence[str] | None, where: str | None) -> pa.Table:
    columns = check_columns(dataset.schema, columns, table)
    with filter_errors(table, where, dataset.schema.names):
        return dataset.to_table(columns=columns, filter=where)


def read_batches(dataset, table: str, columns: Sequence[str] | None, where: str | None,
                 batch_size: int) -> Iterator[pa.RecordBatch]:
    """The rows in batches of at most ``batch_size``; a bad filter is told before the first batch."""
    columns = check_columns(dataset.schema, columns, table)
    with filter_errors(table, where, dataset.schema.names):
        reader = dataset.scanner(columns=columns, filter=where, batch_size=batch_size, batch_readahead=READAHEAD,
                                 fragment_readahead=1, io_buffer_size=IO_BUFFER).to_reader()
    return iter(reader)
