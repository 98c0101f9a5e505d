"""Reading an expression matrix and mapping its samples to patients and slides.

Matrices are genes x samples: the first column holds gene ids, every other column is one sample (TSV, CSV or
parquet). Reading is lenient on purpose: values that are not numbers, missing cells, duplicates and unknown
samples are kept as they are, so that the label gate can name every problem and its rows instead of the reader
stopping at the first one. Only a file that cannot be a matrix at all is an error here, refused at ingest with
its reason: missing, of an unknown format, not UTF-8 (with the line and the ``iconv`` command that converts it),
empty or a header without rows (no genes), no sample column, or a first column that is not gene ids (a sample's
barcode as its header, or expression values in it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from histcode.errors import HistcodeError
from histcode.labels.barcodes import NORMAL, TUMOUR, UNKNOWN, parse_barcode

log = logging.getLogger(__name__)


class ExpressionFileError(HistcodeError, ValueError):
    """The file cannot be read as an expression matrix; the message says why."""


MISSING = {"", "NA", "NaN", "nan", "N/A", "null", "None"}
SOLID_TISSUE_NORMAL = "11"  # the only normal sample type whose expression is a reference for tissue


def check_utf8(path: Path, what: str) -> None:
    """ExpressionFileError naming the first line of a text table that is not UTF-8, with how to convert it
    (a Latin-1 export from a spreadsheet is the usual case)."""
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                byte = line[exc.start:exc.start + 1].hex()
                raise ExpressionFileError(
                    f"{path}: {what} is not UTF-8 text: line {number}, byte {exc.start + 1} is 0x{byte} (Latin-1 or "
                    f"Windows-1252?); convert it, e.g. `iconv -f latin1 -t utf8 {path} > {path.stem}.utf8{path.suffix}`, "
                    "and ingest that") from exc


def read_matrix(path: Path) -> pd.DataFrame:
    """Long format: ``sample_id``, ``gene``, ``value`` (float; NaN where a cell is missing or not a number),
    ``raw`` (the cell as written) and ``value_type`` (number, missing or text)."""
    if not path.is_file():
        raise ExpressionFileError(f"{path}: expression file not found")
    if path.stat().st_size == 0:
        raise ExpressionFileError(f"{path}: the expression file is empty (0 bytes): a matrix has a gene-id column "
                                  "and a column per sample, one row per gene")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".txt", ".csv"):
            check_utf8(path, "the expression file")
            wide = pd.read_csv(path, sep="\t" if suffix != ".csv" else ",", dtype=str, keep_default_na=False)
            wide.columns = [_unmangle(c, wide.columns) for c in wide.columns]
        elif suffix == ".parquet":
            wide = pd.read_parquet(path)
        else:
            raise ExpressionFileError(f"{path}: unknown format {suffix!r}; use .tsv, .csv or .parquet")
    except ExpressionFileError:
        raise
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise ExpressionFileError(f"{path}: not a readable table: {exc}") from exc
    if wide.shape[1] < 2:
        raise ExpressionFileError(f"{path}: needs a gene column and at least one sample column, has {list(wide.columns)}")
    if len(wide) == 0:
        raise ExpressionFileError(f"{path}: a header ({len(wide.columns) - 1} sample columns) and no rows: no gene "
                                  "has an expression value; an empty label set is not ingested")
    problem = gene_column_problem(wide)
    if problem:
        raise ExpressionFileError(f"{path}: {problem}")
    return long_from_wide(wide)


def gene_column_problem(wide: pd.DataFrame) -> str | None:
    """Why the first column of a genes x samples table is not its gene ids, or None: its header is a sample's
    barcode (the gene-id column is missing, so a sample would be read as the genes), or it holds expression
    values (decimal numbers; integer ids such as Entrez's are gene ids)."""
    name = str(wide.columns[0])
    if parse_barcode(name) is not None:
        return (f"the first column is {name!r}, a sample's barcode: the gene-id column is missing (a matrix's first "
                "column names the genes: gene, gene_id, a symbol or Ensembl id per row)")
    values = pd.to_numeric(wide.iloc[:, 0].astype(str).str.strip(), errors="coerce")
    if values.notna().all() and (values % 1 != 0).any():
        return (f"the first column {name!r} holds decimal numbers, not gene ids: the gene-id column is missing (a "
                "matrix's first column names the genes, every other column is one sample)")
    return None


def long_from_wide(wide: pd.DataFrame) -> pd.DataFrame:
    """``read_matrix``'s long format from a genes x samples table whose first column holds the gene ids."""
    columns = ["sample_id", "gene", "value", "raw", "value_type"]
    gene_col = wide.columns[0]
    long = wide.melt(id_vars=[gene_col], var_name="sample_id", value_name="raw").rename(columns={gene_col: "gene"})
    long["gene"] = long["gene"].astype(str)
    raw = long["raw"].astype(object).where(long["raw"].notna(), "").astype(str).str.strip()
    value = pd.to_numeric(raw.where(~raw.isin(MISSING)), errors="coerce")
    long["raw"] = raw
    long["value"] = value.astype(float)
    long["value_type"] = "number"
    long.loc[raw.isin(MISSING), "value_type"] = "missing"
    long.loc[~raw.isin(MISSING) & value.isna(), "value_type"] = "text"
    return long[columns].reset_index(drop=True)


def _unmangle(name: str, names) -> str:
    """pandas renames a repeated column ``S`` to ``S.1``; give it its name back so duplicates stay visible."""
    base, _, suffix = str(name).rpartition(".")
    return base if suffix.isdigit() and base in set(map(str, names)) else name


def read_sample_sheet(path: Path) -> pd.DataFrame:
    """CSV with ``sample_id`` and ``patient_id``, optional ``slide_id`` and ``sample_type`` (tumor/normal)."""
    if not path.is_file():
        raise ExpressionFileError(f"{path}: sample sheet not found")
    check_utf8(path, "the sample sheet")
    sheet = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    missing = {"sample_id", "patient_id"} - set(sheet.columns)
    if missing:
        raise ExpressionFileError(f"{path}: sample sheet needs columns {sorted(missing)}")
    return sheet


def slide_kind(slide: dict) -> str | None:
    """Tumour or normal for a catalog slide: its manifest attribute ``sample_type`` first, else its barcode."""
    attrs = json.loads(slide["attributes"]) if slide.get("attributes") else {}
    declared = str(attrs.get("sample_type", "")).strip().lower()
    if declared in (TUMOUR, "tumour"):
        return TUMOUR
    if declared == NORMAL:
        return NORMAL
    code = parse_barcode(slide["slide_id"])
    return code.kind if code else None


def _type_code(slide_id: str) -> str | None:
    code = parse_barcode(slide_id)
    return code.type_code if code else None


def map_samples(sample_ids: list[str], slides: list[dict], sheet: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per sample: ``patient_id``, ``kind`` (tumor/normal/control/unknown), ``slide_id`` (the tiled slide it
    labels, if any), ``mapped_by`` and ``problem`` (None, or why the sample cannot be used).

    Tumour samples must map to a tiled tumour slide (they carry the labels); normal samples must belong to a
    known patient (they are references and need no slide of their own).
    """
    by_patient: dict[str, list[dict]] = {}
    for s in slides:
        by_patient.setdefault(s["patient_id"], []).append(s)
    sheet_rows = {r["sample_id"]: r for r in sheet.to_dict("records")} if sheet is not None else {}
    rows = []
    for sample in sample_ids:
        row = {"sample_id": sample, "patient_id": None, "kind": UNKNOWN, "type_code": None, "slide_id": None,
               "mapped_by": None, "problem": None}
        if sample in sheet_rows:
            entry = sheet_rows[sample]
            code = parse_barcode(sample)
            row.update(patient_id=entry["patient_id"], mapped_by="sample_sheet",
                       type_code=entry.get("type_code") or (code.type_code if code else None))
            kind = str(entry.get("sample_type", "")).strip().lower()
            row["kind"] = TUMOUR if kind in (TUMOUR, "tumour") else NORMAL if kind == NORMAL else (code.kind if code else UNKNOWN)
            row["slide_id"] = entry.get("slide_id") or None
        else:
            code = parse_barcode(sample)
            if code is None:
                row["problem"] = "not a TCGA barcode and not in the sample sheet"
                rows.append(row)
                continue
            row.update(patient_id=code.patient_id, kind=code.kind, type_code=code.type_code, mapped_by="barcode")
        patient_slides = by_patient.get(row["patient_id"], [])
        if not patient_slides:
            row["problem"] = f"unknown sample: patient {row['patient_id']} has no registered, tiled slide"
        elif row["kind"] not in (TUMOUR, NORMAL):
            row["problem"] = f"sample type {row['type_code']} is neither tumour (01-09) nor normal (10-19)"
        elif row["kind"] == NORMAL and row["type_code"] not in (None, SOLID_TISSUE_NORMAL):
            row["problem"] = (f"normal sample type {row['type_code']} is not solid tissue normal "
                              f"({SOLID_TISSUE_NORMAL}): blood, buccal or bone-marrow expression is no reference for "
                              "a tissue's fold change")
        elif row["kind"] == TUMOUR and row["slide_id"] is None:
            matches = [s for s in patient_slides if slide_kind(s) == TUMOUR]
            same_code = [s for s in matches  # a sample of unknown type (a sheet's own ids) may label any tumour slide
                         if row["type_code"] is None or _type_code(s["slide_id"]) in (None, row["type_code"])]
            if same_code:
                row["slide_id"] = sorted(s["slide_id"] for s in same_code)[0]
            elif matches:
                others = ", ".join(sorted(s["slide_id"] for s in matches))
                row["problem"] = (f"tumour sample of type {row['type_code']} of patient {row['patient_id']}: its tiled "
                                  f"tumour slides ({others}) are of another sample type, and a slide is labelled only "
                                  "by an aliquot of its own sample type (01 primary, 06 metastasis, ...)")
            else:
                row["problem"] = f"tumour sample of patient {row['patient_id']} has no tiled tumour slide"
        elif row["slide_id"] is not None and row["slide_id"] not in {s["slide_id"] for s in patient_slides}:
            row["problem"] = f"sample sheet names slide {row['slide_id']}, which is not a tiled slide of {row['patient_id']}"
        rows.append(row)
    labelled: dict[str, str] = {}
    for row in sorted(rows, key=lambda r: r["sample_id"]):  # 01A before 01B: the lowest vial labels the slide
        if row["kind"] == TUMOUR and row["problem"] is None and row["slide_id"] is not None:
            first = labelled.setdefault(row["slide_id"], row["sample_id"])
            if first != row["sample_id"]:
                row["problem"] = (f"slide {row['slide_id']} is already labelled by sample {first}: one expression "
                                  "sample per slide (the lowest sample id is kept)")
    return pd.DataFrame(rows, columns=["sample_id", "patient_id", "kind", "type_code", "slide_id", "mapped_by", "problem"])


def sample_slides(samples: pd.DataFrame, slides: list[dict]) -> dict[str, list[str]]:
    """Every tiled slide each usable tumour sample labels: the slide ``map_samples`` chose and the other tumour
    slides of its patient of the same sample type (a sample's DX1 and DX2). A slide two samples could claim is
    left to neither (logged): a slide never gets labels from two samples. TCGA expression is per sample, not per
    slide, so a sample's slides share its labels."""
    by_patient: dict[str, list[dict]] = {}
    for s in slides:
        by_patient.setdefault(s["patient_id"], []).append(s)
    usable = samples[samples.problem.isna() & (samples.kind == TUMOUR) & samples.slide_id.notna()]
    claimed = set(usable.slide_id)
    wanted: dict[str, list[str]] = {}
    for r in usable.itertuples():
        code = None if pd.isna(r.type_code) else r.type_code
        for s in by_patient.get(r.patient_id, []):
            if (slide_kind(s) == TUMOUR and s["slide_id"] not in claimed
                    and (code is None or _type_code(s["slide_id"]) in (None, code))):
                wanted.setdefault(s["slide_id"], []).append(r.sample_id)
    contested = {slide: who for slide, who in wanted.items() if len(who) > 1}
    for slide, who in sorted(contested.items()):
        log.warning("slide %s fits samples %s equally: it gets no DE labels", slide, ", ".join(who))
    out = {r.sample_id: [r.slide_id] for r in usable.itertuples()}
    for slide, who in sorted(wanted.items()):
        if slide not in contested:
            out[who[0]].append(slide)
    return out
