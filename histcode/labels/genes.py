"""Control genes: panel genes expected to carry no morphological signal, scored apart by the heads.

Resolved once, at label ingest, and stored with the label set (its params' ``control_genes``): an explicit
``labels.control_genes`` wins (``()``: none); left unset (None), the cohort's gene table says. That table is
``labels.gene_table`` or else ``genes.csv`` beside the expression matrix (the demo writes one): a CSV (TSV for
``.tsv``/``.txt``) with a ``gene`` column and a ``control`` column (true/false) or a ``morphological_signal``
column (a control is a gene without one). The controls are the table's control genes that are in the panel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from histcode.config import LabelsConfig
from histcode.labels.expression import ExpressionFileError
from histcode.wsi.files import file_sha256

log = logging.getLogger(__name__)

GENE_TABLE = "genes.csv"  # the name looked for beside the expression matrix
TRUE, FALSE = {"true", "t", "yes", "y", "1"}, {"false", "f", "no", "n", "0"}


class GeneTableError(ExpressionFileError):
    """The gene table cannot say which genes are controls; the message names the file and why."""


@dataclass(frozen=True)
class ControlGenes:
    genes: tuple[str, ...]
    source: str  # "labels.control_genes", the table read, or "none"
    table: Path | None = None  # the gene table read (None: none was)

    def digest(self) -> str | None:
        """The table's contents (a changed table is a new label set); None when no table was read."""
        return file_sha256(self.table) if self.table is not None else None


def gene_table_path(configured: Path | None, matrix: Path | None) -> Path | None:
    """The gene table to read: ``configured`` (``labels.gene_table``, resolved; it must exist), else
    ``genes.csv`` beside ``matrix`` if there is one, else None."""
    if configured is not None:
        if not configured.is_file():
            raise GeneTableError(f"{configured}: gene table (labels.gene_table) not found")
        return configured
    beside = matrix.parent / GENE_TABLE if matrix is not None else None
    return beside if beside is not None and beside.is_file() else None


def _flags(values: pd.Series, path: Path, column: str, genes: pd.Series) -> pd.Series:
    """A true/false column as booleans; a cell that is neither is an error naming the file, column and gene."""
    text = values.astype(str).str.strip().str.lower()
    bad = ~text.isin(TRUE | FALSE)
    if bad.any():
        shown = ", ".join(f"{g}: {v!r}" for g, v in zip(genes[bad][:5], values[bad][:5]))
        raise GeneTableError(f"{path}: column {column!r} must be true or false, not ({shown})")
    return text.isin(TRUE)


def read_control_genes(path: Path, panel: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """(the panel genes the table marks as controls, in panel order; the column that said so)."""
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") else ","
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise GeneTableError(f"{path}: not a readable gene table: {exc}") from exc
    if "gene" not in table.columns:
        raise GeneTableError(f"{path}: gene table has no 'gene' column (columns: {list(table.columns)})")
    genes = table.gene.str.strip()
    if "control" in table.columns:
        column, control = "control", _flags(table.control, path, "control", genes)
    elif "morphological_signal" in table.columns:
        column = "morphological_signal"
        control = ~_flags(table.morphological_signal, path, column, genes)
    else:
        raise GeneTableError(f"{path}: gene table has neither a 'control' nor a 'morphological_signal' column "
                             f"(columns: {list(table.columns)}); add one, or set labels.control_genes")
    marked = set(genes[control])
    return tuple(g for g in panel if g in marked), column


def resolve_control_genes(lcfg: LabelsConfig, table: Path | None) -> ControlGenes:
    """The label set's control genes: ``labels.control_genes`` if set, else the gene table's ``table`` (see
    ``gene_table_path``), else none."""
    if lcfg.control_genes is not None:
        return ControlGenes(tuple(lcfg.control_genes), "labels.control_genes")
    if table is None:
        log.info("no gene table (labels.gene_table unset and no %s beside the expression matrix): no control genes",
                 GENE_TABLE)
        return ControlGenes((), "none")
    genes, column = read_control_genes(table, tuple(lcfg.panel))
    log.info("control genes from %s (column %s): %s", table, column, ", ".join(genes) or "none in the panel")
    return ControlGenes(genes, str(table), table)
