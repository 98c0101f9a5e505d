"""Expression from a GDC download: the sample sheet, STAR "augmented gene counts" files, the clinical TSV.

A GDC RNA-seq download (``gdc-client download -m gdc_manifest.txt -d DIR``) is one folder per file UUID, each
holding one ``<uuid>.rna_seq.augmented_star_gene_counts.tsv``::

    # gene-model: GENCODE v36
    gene_id  gene_name  gene_type  unstranded  stranded_first  stranded_second  tpm_unstranded  fpkm_unstranded  fpkm_uq_unstranded
    N_unmapped  N_multimapping  N_noFeature  N_ambiguous         (counts only; tpm/fpkm cells empty)
    ENSG00000000003.15  TSPAN6  protein_coding  1234  617  617  12.3  4.5  5.6

``read_gdc_expression`` turns the download into exactly what ``histcode.labels.expression`` reads from a matrix:
the long table of ``read_matrix`` (one sample per file, named by the sheet's ``Sample ID``) and a sample sheet
(``sample_id, patient_id, sample_type, type_code``) for ``map_samples``, so the label gate, DE labelling and the
folds are the matrix path's. Slides join expression by patient and sample type code (01 tumour, 11 normal): a
slide's sample field (``01Z``) and an aliquot's (``01A``) differ in the vial letter only.

The **unit** is one column of the files (``tpm_unstranded`` by default; the count columns are labelled as counts,
scaled to counts per million). **Genes** are named by symbol (``gene_name``) or by Ensembl id without its version
(``ENSG00000000003``). Duplicates, by a fixed rule: rows whose id ends in ``_PAR_Y`` (the chrY copies of the
pseudoautosomal genes, which GENCODE gives their own rows and STAR leaves at zero) are dropped; of the rows left
that share a name (a symbol of two loci, readthrough genes), the row with the highest mean value of the unit over
all samples is kept (ties: the lowest gene id), the others dropped, none summed.

Clinical TSV (the portal's clinical export, one row per case and diagnosis or treatment; ``'--`` is missing):
the subtype per patient (``case_submitter_id``) is its project without ``TCGA-`` (``project_id`` TCGA-LUAD ->
LUAD) or the values of a named column.

Every malformed input raises ``ExpressionFileError`` naming the file, line and reason, before anything is read
into the workspace: a sheet row whose file is missing, a counts file with another header, mixed gene models,
one sample in two files, a file of several samples, an unknown sample type.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histcode.ingest.gdc import SheetRow, downloaded_path, read_gdc_sheet, subtype_of_project
from histcode.ingest.sources import ManifestError
from histcode.labels.expression import ExpressionFileError, long_from_wide
from histcode.wsi.files import file_sha256

log = logging.getLogger(__name__)

STAR_SUFFIX = ".rna_seq.augmented_star_gene_counts.tsv"
STAR_COLUMNS = ("gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
                "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded")
UNITS = STAR_COLUMNS[3:]
GENE_MODEL = "# gene-model:"
PAR_Y = "_PAR_Y"
GENE_KEYS = ("symbol", "ensembl")
CLINICAL_PATIENT = ("case_submitter_id", "cases.submitter_id")
CLINICAL_PROJECT = ("project_id", "project.project_id")
CLINICAL_MISSING = {"", "'--", "--", "NA", "not reported", "Not Reported", "unknown", "Unknown"}


def label_unit(unit: str) -> str:
    """The ``labels.unit`` a STAR column is labelled in: TPM, FPKM (also FPKM-UQ) or counts."""
    if unit not in UNITS:
        raise ExpressionFileError(f"GDC unit {unit!r}: use one of {', '.join(UNITS)}")
    return "TPM" if unit.startswith("tpm") else "FPKM" if unit.startswith("fpkm") else "counts"


@dataclass(frozen=True)
class GdcDownload:
    """A GDC RNA-seq download: its sample sheet, the folder gdc-client wrote, the optional clinical TSV, and how to
    read them (unit column, gene key, the clinical column that holds the subtype; None: the project)."""

    sheet: Path
    root: Path
    clinical: Path | None = None
    unit: str = "tpm_unstranded"
    genes: str = "symbol"
    subtype_column: str | None = None

    def counts_files(self) -> list[tuple[SheetRow, Path]]:
        """The sheet's STAR counts rows with their files, checked (ExpressionFileError names the line otherwise)."""
        label_unit(self.unit)
        if self.genes not in GENE_KEYS:
            raise ExpressionFileError(f"GDC gene key {self.genes!r}: use symbol or ensembl")
        if not self.root.is_dir():
            raise ExpressionFileError(f"GDC download {self.root}: not a folder")
        try:
            rows = read_gdc_sheet(self.sheet)
            counts = [r for r in rows if r.file_name.endswith(STAR_SUFFIX)]
            if len(counts) < len(rows):
                log.info("%s: %d of %d files are not STAR gene counts (*%s); skipped", self.sheet,
                         len(rows) - len(counts), len(rows), STAR_SUFFIX)
            if not counts:
                raise ManifestError(f"GDC sample sheet {self.sheet}: no STAR gene counts files (*{STAR_SUFFIX})")
            seen: dict[str, SheetRow] = {}
            for r in counts:
                if r.sample_id in seen:
                    first = seen[r.sample_id]
                    raise ManifestError(f"{r.where(self.sheet)}: sample {r.sample_id} also has the file {first.file_name} "
                                        f"(line {first.line}); keep one file per sample in the sheet")
                seen[r.sample_id] = r
            return [(r, downloaded_path(self.root, r, self.sheet)) for r in counts]
        except ManifestError as exc:
            raise ExpressionFileError(str(exc)) from exc

    def digest(self) -> str:
        """SHA-256 over the sheet, every counts file it lists, the clinical TSV and the reading options."""
        files = [self.sheet, *(p for _, p in self.counts_files()), *([self.clinical] if self.clinical else [])]
        parts = [file_sha256(path) for path in files] + [repr((self.unit, self.genes, self.subtype_column))]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass
class GdcExpression:
    long: pd.DataFrame  # read_matrix's long format, one sample per counts file
    sheet: pd.DataFrame  # sample_id, patient_id, sample_type, type_code, file_id, project_id
    subtypes: dict[str, str] | None  # patient -> subtype from the clinical TSV; None without one
    gene_model: str
    dropped_duplicates: int  # rows dropped by the duplicate rule (PAR_Y and shared names)


def read_star_counts(path: Path, unit: str) -> tuple[str, pd.DataFrame]:
    """(gene model, table of gene_id, gene_name and the unit's cells as written) of one STAR counts file, the
    ``N_*`` summary rows left out. ExpressionFileError when the file is not in GDC's format."""
    try:
        with path.open(encoding="utf-8") as fh:
            first = fh.readline().rstrip("\r\n")
        if not first.startswith(GENE_MODEL):
            raise ExpressionFileError(f"{path}, line 1: expected '{GENE_MODEL} ...' (GDC's STAR augmented gene "
                                      f"counts), found {first[:80]!r}")
        table = pd.read_csv(path, sep="\t", skiprows=1, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as exc:
        raise ExpressionFileError(f"{path}: not a readable STAR gene counts TSV (a compressed or damaged file?): "
                                  f"{exc}") from exc
    if tuple(table.columns) != STAR_COLUMNS:
        raise ExpressionFileError(f"{path}, line 2: the header is {'  '.join(map(str, table.columns))!r}, not the STAR "
                                  f"augmented gene counts header {'  '.join(STAR_COLUMNS)!r}")
    table = table[~table.gene_id.str.startswith("N_")]
    empty = table.index[table.gene_id.str.strip() == ""]
    if len(empty):
        raise ExpressionFileError(f"{path}, line {int(empty[0]) + 3}: empty gene_id")
    return first[len(GENE_MODEL):].strip(), table[["gene_id", "gene_name", unit]].reset_index(drop=True)


def collapse_duplicates(table: pd.DataFrame, key: str) -> tuple[pd.DataFrame, int]:
    """genes x samples from ``gene_id, gene_name, <sample columns>``: named by ``key`` (symbol or ensembl), the
    ``_PAR_Y`` rows dropped, then of rows sharing a name the one with the highest mean over the samples kept (ties:
    the lowest gene id). Returns the table (first column ``gene``) and how many rows were dropped."""
    kept = table[~table.gene_id.str.endswith(PAR_Y)]
    names = kept.gene_name if key == "symbol" else kept.gene_id.str.split(".", n=1).str[0]
    samples = [c for c in table.columns if c not in ("gene_id", "gene_name")]
    mean = kept[samples].apply(pd.to_numeric, errors="coerce").mean(axis=1).fillna(-np.inf)
    order = pd.DataFrame({"name": names, "mean": -mean, "gene_id": kept.gene_id}).sort_values(["name", "mean", "gene_id"])
    chosen = order.drop_duplicates("name").index
    wide = kept.loc[sorted(chosen)]
    out = pd.concat([names.loc[wide.index].rename("gene"), wide[samples]], axis=1).reset_index(drop=True)
    dropped = len(table) - len(out)
    if dropped:
        log.info("GDC genes by %s: %d rows dropped (%d _PAR_Y, %d sharing a name with a higher-mean row)", key, dropped,
                 len(table) - len(kept), len(kept) - len(out))
    return out, dropped


def read_gdc_expression(download: GdcDownload) -> GdcExpression:
    """The download as ``read_matrix``'s long table plus a sample sheet, with the clinical subtypes when given."""
    files = download.counts_files()
    model, reference, columns = None, None, {}
    for row, path in files:
        file_model, table = read_star_counts(path, download.unit)
        if model is None:
            model, reference = (file_model, row, table), table.gene_id
        elif file_model != model[0]:
            raise ExpressionFileError(f"mixed gene models: {path} is {file_model!r}, {files[0][1]} is {model[0]!r}; "
                                      "download the files of one GDC data release")
        elif not table.gene_id.equals(reference):
            at = _first_difference(table.gene_id, reference)
            raise ExpressionFileError(f"{path}: its gene rows differ from {files[0][1]}'s (same gene model "
                                      f"{file_model!r}) from line {at + 7}: a truncated or edited file")
        columns[row.sample_id] = table[download.unit].to_numpy()
    first = model[2]
    wide, dropped = collapse_duplicates(
        pd.concat([first[["gene_id", "gene_name"]], pd.DataFrame(columns, index=first.index)], axis=1), download.genes)
    sheet = pd.DataFrame([{"sample_id": r.sample_id, "patient_id": r.case_id, "sample_type": r.kind,
                           "type_code": r.type_code, "file_id": r.file_id, "project_id": r.project_id}
                          for r, _ in files])
    subtypes = read_gdc_clinical(download.clinical, download.subtype_column) if download.clinical else None
    log.info("GDC download %s: %d samples of %d patients, %d genes by %s (%s, %s)", download.root, len(files),
             sheet.patient_id.nunique(), len(wide), download.genes, download.unit, model[0])
    return GdcExpression(long_from_wide(wide), sheet, subtypes, model[0], dropped)


def _first_difference(a: pd.Series, b: pd.Series) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a.to_numpy()[:n] != b.to_numpy()[:n])
    return int(diff[0]) if len(diff) else n


def read_gdc_clinical(path: Path, column: str | None = None) -> dict[str, str]:
    """Patient (``case_submitter_id``) -> subtype: the project without ``TCGA-``, or the values of ``column``.
    A patient whose rows disagree is an error; a patient with only missing values (``'--``) has no subtype."""
    if not path.is_file():
        raise ExpressionFileError(f"clinical TSV {path}: file not found")
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as exc:
        raise ExpressionFileError(f"clinical TSV {path}: not a readable TSV: {exc}") from exc
    patient = next((c for c in CLINICAL_PATIENT if c in frame.columns), None)
    source = column or next((c for c in CLINICAL_PROJECT if c in frame.columns), None)
    if patient is None or source is None or source not in frame.columns:
        need = [c for c, found in ((CLINICAL_PATIENT[0], patient), (column or CLINICAL_PROJECT[0], source))
                if found is None or found not in frame.columns]
        raise ExpressionFileError(f"clinical TSV {path}: lacks the column(s) {need} (GDC's clinical export names the "
                                  "patient case_submitter_id and the project project_id)")
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, (pid, value) in enumerate(zip(frame[patient].str.strip(), frame[source].str.strip()), start=2):
        if not pid or value in CLINICAL_MISSING:
            continue
        subtype = value if column else subtype_of_project(value)
        if pid in out and out[pid] != subtype:
            raise ExpressionFileError(f"clinical TSV {path}, line {line}: patient {pid} has {source} {value!r}, line "
                                      f"{first_line[pid]} gives {out[pid]!r}")
        out.setdefault(pid, subtype)
        first_line.setdefault(pid, line)
    log.info("clinical TSV %s: a subtype (%s) for %d patients", path, source, len(out))
    return out
