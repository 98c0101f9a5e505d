"""GDC downloads as gdc-client writes them: the sample sheet, the manifest, and slides named by their barcodes.

``gdc-client download -m gdc_manifest.txt -d DIR`` puts every file in a folder named by its File ID:
``DIR/<file UUID>/<file name>``. The portal's cart gives two tables beside it:

- the **manifest** (``gdc_manifest.txt``; columns ``id  filename  md5  size  state``): which files, nothing
  about them;
- the **sample sheet** (``gdc_sample_sheet.<date>.tsv``; columns ``File ID, File Name, Data Category, Data Type,
  Project ID, Case ID, Sample ID, Sample Type``, and in newer exports ``Tissue Type, Tumor Descriptor, Specimen
  Type, Preservation Method``): the case and sample of each file. A file made from several samples lists them
  comma-separated in ``Case ID`` and ``Sample ID``; such a file cannot label one sample and is refused.

Slides are named ``TCGA-05-4244-01Z-00-DX1.<file UUID>.svs``: the slide barcode is the part before the first dot,
its first three fields the patient, its sample field the sample type (01 primary tumour, 11 solid tissue normal)
and its last field the section: ``DX`` diagnostic slides are formalin-fixed, paraffin-embedded (FFPE); ``TS``,
``BS`` and ``MS`` (top, bottom, middle section) are frozen sections cut beside the sample that was sequenced.

Everything here is checked before anything is ingested: a malformed sheet, a missing file, a File ID or file name
that is not one plain name (a path separator, ``..``: a listing must not point outside the download) or a slide
that is not a TCGA slide barcode raises ``ManifestError`` naming the file, line and reason, so nothing is written.
A manifest's ``size`` and ``md5`` are compared with each listed slide (size first; md5 only of a file of the right
size, and not again for a slide registered unchanged since it was checked): a slide that differs is refused by
name with what was expected and what was found, and the others go on (``GdcSources.refused``, ``ingest_gdc``).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from histcode.config import IngestConfig
from histcode.ingest.run import IngestReport, ingest_sources, is_unchanged, refused_outcome
from histcode.ingest.sources import ManifestError, SlideSource

log = logging.getLogger(__name__)

# GDC sample type names (the TCGA code tables' "Sample Type" column) -> the two-digit code of a barcode
SAMPLE_TYPE_CODES = {
    "primary tumor": "01", "recurrent tumor": "02", "primary blood derived cancer - peripheral blood": "03",
    "recurrent blood derived cancer - bone marrow": "04", "additional - new primary": "05", "metastatic": "06",
    "additional metastatic": "07", "human tumor original cells": "08",
    "primary blood derived cancer - bone marrow": "09", "blood derived normal": "10", "solid tissue normal": "11",
    "buccal cell normal": "12", "ebv immortalized normal": "13", "bone marrow normal": "14",
    "fibroblasts from bone marrow normal": "15", "mononuclear cells from bone marrow normal": "16",
    "control analyte": "20", "recurrent blood derived cancer - peripheral blood": "40", "cell lines": "50",
    "primary xenograft tissue": "60", "cell line derived xenograft tissue": "61",
}
# newer sample sheets' "Tissue Type" column (where "Sample Type" is gone)
TISSUE_TYPES = {"tumor": "tumor", "normal": "normal"}
TUMOUR, NORMAL = "tumor", "normal"

SLIDE_BARCODE = re.compile(r"^(?P<patient>TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-(?P<code>\d{2})(?P<vial>[A-Z])-(?P<portion>\d{2})-"
                           r"(?P<section>DX|TS|BS|MS)(?P<number>[0-9A-Z]+)$", re.IGNORECASE)
SAMPLE_BARCODE = re.compile(r"^(?P<patient>TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-(?P<code>\d{2})", re.IGNORECASE)
FFPE, FROZEN = "dx", "frozen"
SLIDE_TYPES = {"DX": FFPE, "TS": FROZEN, "BS": FROZEN, "MS": FROZEN}
SLIDE_TYPE_CHOICES = (FFPE, FROZEN, "all")

SHEET_REQUIRED = ("File ID", "File Name", "Case ID", "Sample ID")
SHEET_OPTIONAL = ("Data Category", "Data Type", "Project ID", "Tissue Type", "Tumor Descriptor", "Specimen Type",
                  "Preservation Method")
MANIFEST_COLUMNS = ("id", "filename")
MD5 = re.compile(r"^[0-9a-f]{32}$", re.IGNORECASE)
MD5_ATTRIBUTE = "gdc_md5"  # the manifest's md5 of a registered slide: checked when it was registered
CHUNK = 8 << 20


def kind_of_code(code: str) -> str | None:
    """tumor for 01-09, normal for 10-19, None for anything else (controls, cell lines, xenografts)."""
    n = int(code)
    return TUMOUR if 1 <= n <= 9 else NORMAL if 10 <= n <= 19 else None


def subtype_of_project(project_id: str) -> str:
    """The subtype a GDC project names: ``TCGA-LUAD`` -> ``LUAD``; a project of another program as it is."""
    return project_id[5:] if project_id.upper().startswith("TCGA-") else project_id


@dataclass(frozen=True)
class SheetRow:
    """One file of a GDC sample sheet (or manifest: then only ``file_id`` and ``file_name`` are known)."""

    line: int
    file_id: str
    file_name: str
    case_id: str | None = None
    sample_id: str | None = None
    kind: str | None = None  # tumor | normal
    type_code: str | None = None  # the barcode's two digits, or the sample type's
    sample_type: str | None = None  # as the sheet writes it
    project_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # Data Type, Tissue Type, ... as written
    md5: str | None = None  # a manifest's, lower case
    size: int | None = None  # a manifest's, bytes

    def where(self, sheet: Path) -> str:
        return f"{sheet}, line {self.line} ({self.file_name})"


def _read_tsv(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise ManifestError(f"{what} {path}: file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str) or v is None}
                    for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{what} {path}: not a UTF-8 TSV ({exc}); save it again as UTF-8 text, tab-separated") from exc
    return columns, rows


def name_problem(value: str) -> str | None:
    """Why a File ID or file name cannot name one entry of a download folder, or None: it is joined to the
    download's path, so a separator or ``..`` would reach files outside it."""
    if "/" in value or "\\" in value:
        return "holds a path separator"
    if value in (".", ".."):
        return "is a relative path component"
    if "\x00" in value:
        return "holds a NUL character"
    return None


def _plain_name(value: str, column: str, where: str) -> str:
    problem = name_problem(value)
    if problem:
        raise ManifestError(f"{where}: {column} {value!r} {problem}: a listing names files inside the download "
                            "folder only (DIR/<File ID>/<File Name>)")
    return value


def _one(value: str, column: str, where: str) -> str:
    """A cell that must name one id: several comma-separated ids that are all the same are that id."""
    ids = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not ids:
        raise ManifestError(f"{where}: empty {column!r}")
    if len(ids) > 1:
        raise ManifestError(f"{where}: {column!r} holds {len(ids)} ids ({', '.join(ids)}): the file was made from several "
                            "samples and cannot label one; remove its row from the sheet")
    return ids[0]


def _sample_kind(row: dict[str, str], sample_id: str, where: str) -> tuple[str, str | None, str]:
    """(kind, type code, the sheet's words) of a sheet row, from ``Sample Type`` or else ``Tissue Type``, checked
    against the sample barcode's own type code when the sample id is a TCGA barcode."""
    barcode = SAMPLE_BARCODE.match(sample_id)
    if row.get("Sample Type"):
        words = _one(row["Sample Type"], "Sample Type", where)
        code = SAMPLE_TYPE_CODES.get(words.lower())
        if code is None:
            raise ManifestError(f"{where}: unknown Sample Type {words!r}; known: GDC's names such as 'Primary Tumor', "
                                "'Solid Tissue Normal' (see histcode.ingest.gdc.SAMPLE_TYPE_CODES)")
        kind = kind_of_code(code)
    elif row.get("Tissue Type"):
        words = _one(row["Tissue Type"], "Tissue Type", where)
        kind = TISSUE_TYPES.get(words.lower())
        if kind is None:
            raise ManifestError(f"{where}: Tissue Type {words!r} is neither Tumor nor Normal")
        code = barcode["code"] if barcode else None
    else:
        raise ManifestError(f"{where}: neither 'Sample Type' nor 'Tissue Type' is given")
    if kind is None:
        raise ManifestError(f"{where}: Sample Type {words!r} (code {code}) is neither tumour (01-09) nor normal "
                            "(10-19); remove its row from the sheet")
    if barcode and kind_of_code(barcode["code"]) != kind:
        raise ManifestError(f"{where}: Sample ID {sample_id} has sample type {barcode['code']} but the sheet says {words!r}")
    return kind, (barcode["code"] if barcode else code), words


def read_gdc_sheet(path: Path) -> list[SheetRow]:
    """The rows of a GDC sample sheet, every one checked: required columns, one case and sample per file, a known
    sample type that agrees with the sample barcode, each File ID once. ManifestError names the line otherwise."""
    columns, rows = _read_tsv(path, "GDC sample sheet")
    missing = [c for c in SHEET_REQUIRED if c not in columns]
    if missing or not ({"Sample Type", "Tissue Type"} & set(columns)):
        need = missing + ([] if {"Sample Type", "Tissue Type"} & set(columns) else ["Sample Type or Tissue Type"])
        raise ManifestError(f"GDC sample sheet {path}: lacks the columns {need} (has {columns}); the sample sheet is the "
                            "TSV the GDC cart's 'Sample Sheet' button downloads")
    out, seen = [], {}
    for line, row in enumerate(rows, start=2):
        file_id, file_name = row.get("File ID", ""), row.get("File Name", "")
        where = f"GDC sample sheet {path}, line {line} ({file_name or file_id})"
        if not file_id or not file_name:
            raise ManifestError(f"{where}: empty 'File ID' or 'File Name'")
        _plain_name(file_id, "File ID", where)
        _plain_name(file_name, "File Name", where)
        if file_id in seen:
            raise ManifestError(f"{where}: File ID {file_id} is also on line {seen[file_id]}")
        seen[file_id] = line
        case_id = _one(row.get("Case ID", ""), "Case ID", where)
        sample_id = _one(row.get("Sample ID", ""), "Sample ID", where)
        kind, code, words = _sample_kind(row, sample_id, where)
        barcode = SAMPLE_BARCODE.match(sample_id)
        if barcode and barcode["patient"].upper() != case_id.upper():
            raise ManifestError(f"{where}: Sample ID {sample_id} belongs to patient {barcode['patient']}, not to Case ID {case_id}")
        project = row.get("Project ID") or None
        extra = {c: row[c] for c in SHEET_OPTIONAL if row.get(c)}
        out.append(SheetRow(line, file_id, file_name, case_id, sample_id, kind, code, words, project, extra))
    log.debug("GDC sample sheet %s: %d files", path, len(out))
    return out


def _manifest_size(value: str, where: str) -> int | None:
    if not value:
        return None
    if not value.isdigit():
        raise ManifestError(f"{where}: size {value!r} is not a number of bytes")
    return int(value)


def _manifest_md5(value: str, where: str) -> str | None:
    if not value:
        return None
    if not MD5.match(value):
        raise ManifestError(f"{where}: md5 {value!r} is not an MD5 digest (32 hexadecimal digits)")
    return value.lower()


def read_gdc_manifest(path: Path) -> list[SheetRow]:
    """The files of a gdc-client manifest (``id  filename  md5  size  state``), each id and file name one plain
    name; ``md5`` and ``size`` are kept (and checked against the files by ``gdc_slide_sources``)."""
    columns, rows = _read_tsv(path, "GDC manifest")
    if any(c not in columns for c in MANIFEST_COLUMNS):
        raise ManifestError(f"GDC manifest {path}: needs the columns {list(MANIFEST_COLUMNS)} (has {columns})")
    out = []
    for line, row in enumerate(rows, start=2):
        where = f"GDC manifest {path}, line {line}"
        if not row["id"] or not row["filename"]:
            raise ManifestError(f"{where}: empty 'id' or 'filename'")
        where = f"{where} ({row['filename']})"
        _plain_name(row["id"], "id", where)
        _plain_name(row["filename"], "filename", where)
        out.append(SheetRow(line, row["id"], row["filename"], md5=_manifest_md5(row.get("md5") or "", where),
                            size=_manifest_size(row.get("size") or "", where)))
    return out


def read_gdc_listing(path: Path) -> list[SheetRow]:
    """A sample sheet or a manifest, told apart by their headers."""
    columns, _ = _read_tsv(path, "GDC sample sheet or manifest")
    return read_gdc_manifest(path) if "File ID" not in columns and "id" in columns else read_gdc_sheet(path)


def downloaded_path(root: Path, row: SheetRow, listing: Path) -> Path:
    """Where gdc-client put a listed file (``root/<File ID>/<File Name>``); ManifestError when it is not there
    or when the row's names would leave ``root``."""
    _plain_name(row.file_id, "File ID", row.where(listing))
    _plain_name(row.file_name, "File Name", row.where(listing))
    path = root / row.file_id / row.file_name
    if not path.is_file():
        raise ManifestError(f"{row.where(listing)}: file not found at {path} (gdc-client puts each file in a folder "
                            "named by its File ID: run `gdc-client download -m gdc_manifest.txt -d DIR` again)")
    return path


@dataclass(frozen=True)
class SlideBarcode:
    barcode: str
    patient_id: str
    type_code: str
    kind: str
    section: str  # DX1, TS1, ...
    slide_type: str  # dx | frozen


def parse_slide_name(path: Path) -> SlideBarcode:
    """The slide barcode of a GDC slide file (``TCGA-05-4244-01Z-00-DX1.<uuid>.svs``); ManifestError if it has none."""
    barcode = path.name.split(".", 1)[0]
    match = SLIDE_BARCODE.match(barcode)
    if not match:
        raise ManifestError(f"{path}: {barcode!r} is not a TCGA slide barcode (TCGA-XX-XXXX-01Z-00-DX1): GDC slide "
                            "import reads slides by their GDC names")
    kind = kind_of_code(match["code"])
    if kind is None:
        raise ManifestError(f"{path}: sample type {match['code']} of {barcode} is neither tumour (01-09) nor normal (10-19)")
    section = (match["section"] + match["number"]).upper()
    return SlideBarcode(barcode, match["patient"].upper(), match["code"], kind, section,
                        SLIDE_TYPES[match["section"].upper()])


def _listed_slides(root: Path, listing: Path, extensions: tuple[str, ...]) -> list[tuple[Path, SheetRow]]:
    rows = read_gdc_listing(listing)
    slides = [r for r in rows if Path(r.file_name).suffix.lower() in extensions]
    if len(slides) < len(rows):
        log.info("%s: %d of %d files are not slides (no slide extension); skipped", listing, len(rows) - len(slides),
                 len(rows))
    return [(downloaded_path(root, r, listing), r) for r in slides]


def _found_slides(root: Path, extensions: tuple[str, ...]) -> list[tuple[Path, SheetRow]]:
    if not root.is_dir():
        raise ManifestError(f"GDC download {root}: not a folder")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in extensions)
    return [(f, SheetRow(0, f.parent.name if f.parent != root else "", f.name)) for f in files]


def _check_against_sheet(slide: SlideBarcode, row: SheetRow, where: str) -> None:
    if row.case_id and row.case_id.upper() != slide.patient_id:
        raise ManifestError(f"{where}: the slide {slide.barcode} is of patient {slide.patient_id}, the sheet says "
                            f"Case ID {row.case_id}")
    if row.kind and row.kind != slide.kind:
        raise ManifestError(f"{where}: the slide {slide.barcode} has sample type {slide.type_code} ({slide.kind}), the "
                            f"sheet says {row.sample_type!r}")


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # GDC's checksum of the file, not a security primitive here
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def integrity_problem(path: Path, row: SheetRow, checked: bool = False) -> str | None:
    """Why a downloaded file is not the one its manifest row describes, or None: its size first (an incomplete
    download), then, for a file of the right size, its md5 (``checked``: its md5 was compared when it was
    registered and the file has not changed since, so it is not read again)."""
    if row.size is not None:
        found = path.stat().st_size
        if found != row.size:
            return (f"its size is {found} bytes, the manifest says {row.size}: an incomplete or another download; "
                    "run `gdc-client download` for it again")
    if row.md5 is not None and not checked:
        found = file_md5(path)
        if found != row.md5:
            return (f"its md5 is {found}, the manifest says {row.md5}: the file is damaged or not the one listed; "
                    "download it again")
    return None


class GdcSources(list):
    """The slides of a GDC download to ingest (a list of ``SlideSource``), and ``refused``: the listed slides
    whose file is not the one the manifest describes, each with its reason."""

    def __init__(self, sources=(), refused: list[tuple[SlideSource, str]] | None = None) -> None:
        super().__init__(sources)
        self.refused = refused or []


def gdc_slide_sources(root: Path, listing: Path | None = None, slide_type: str = FFPE,
                      extensions: tuple[str, ...] = (".svs",), mpp: float | None = None,
                      checked: Callable[[SlideSource], bool] | None = None) -> GdcSources:
    """The slides of a GDC download as sources for ``histcode.ingest.run.ingest_sources``: the files a sample sheet
    or manifest lists (each must be at ``root/<File ID>/<File Name>``), else every slide file below ``root``.

    slide_id is the slide barcode and patient_id its patient; attributes carry ``sample_type`` (tumor/normal),
    ``slide_type`` (dx: FFPE diagnostic; frozen: TS/BS/MS sections), ``section``, ``file_id`` (the UUID folder)
    and, from a sample sheet, ``gdc_sample_type``, ``project_id`` and, on tumour slides, ``subtype`` (the project
    without ``TCGA-``). Only slides of ``slide_type`` (dx, frozen or all) are returned. Several slides of one
    patient or sample are separate slides; the same barcode twice is refused.

    A manifest's size and md5 are compared with each slide's file (``integrity_problem``; the md5 becomes the
    slide's ``gdc_md5`` attribute, and ``checked(source)`` True skips reading it again): a slide that differs is
    in ``refused`` with the reason, logged, and the others are returned.
    """
    if slide_type not in SLIDE_TYPE_CHOICES:
        raise ManifestError(f"slide type {slide_type!r}: use one of {', '.join(SLIDE_TYPE_CHOICES)}")
    found = _listed_slides(root, listing, extensions) if listing else _found_slides(root, extensions)
    sources, refused, seen, skipped = [], [], {}, 0
    for path, row in found:
        slide = parse_slide_name(path)
        where = row.where(listing) if listing else str(path)
        _check_against_sheet(slide, row, where)
        if slide.barcode in seen:
            raise ManifestError(f"{where}: slide {slide.barcode} is also at {seen[slide.barcode]}")
        seen[slide.barcode] = path
        if slide_type != "all" and slide.slide_type != slide_type:
            skipped += 1
            continue
        attributes = {"sample_type": slide.kind, "slide_type": slide.slide_type, "section": slide.section}
        if row.file_id:
            attributes["file_id"] = row.file_id
        if row.sample_type:
            attributes["gdc_sample_type"] = row.sample_type
        if row.project_id:
            attributes["project_id"] = row.project_id
            if slide.kind == TUMOUR:
                attributes["subtype"] = subtype_of_project(row.project_id)
        if row.md5:
            attributes[MD5_ATTRIBUTE] = row.md5
        source = SlideSource(path=path.absolute(), slide_id=slide.barcode, patient_id=slide.patient_id, mpp=mpp,
                             attributes=tuple(attributes.items()))
        problem = integrity_problem(path, row, checked is not None and row.md5 is not None and checked(source))
        if problem:
            log.warning("%s: slide %s refused: %s", where, slide.barcode, problem)
            refused.append((source, f"slide {slide.barcode} ({row.file_name}): {problem}"))
            continue
        sources.append(source)
    if skipped:
        log.info("GDC download %s: %d slides that are not %s skipped (--slide-type all takes every slide)", root,
                 skipped, slide_type)
    if not sources and refused:
        raise ManifestError(f"GDC download {root}: every listed slide was refused: "
                            + "; ".join(reason for _, reason in refused))
    if not sources:
        raise ManifestError(f"GDC download {root}: no {'' if slide_type == 'all' else slide_type + ' '}slides found"
                            + (f" of the files {listing} lists" if listing else ""))
    return GdcSources(sources, refused)


def ingest_gdc(root: Path, listing: Path | None, catalog, cfg: IngestConfig, slide_type: str | None = None,
               mpp: float | None = None, cohort: str | None = None, progress: bool = True) -> IngestReport:
    """``histcode ingest --gdc``: the download's slides (``gdc_slide_sources``) registered in ``cohort``, the
    slides whose file is not the one the manifest describes reported as failed, with their reasons (nothing of
    them is written). A slide registered unchanged, with the manifest's md5, is not read again for it."""
    target = cohort or cfg.cohort

    def checked(source: SlideSource) -> bool:
        existing = catalog.get_slide(source.slide_id) if catalog.path.exists() else None
        return is_unchanged(existing, source, source.cohort or target, cfg.default_mpp)

    sources = gdc_slide_sources(root, listing, slide_type or cfg.gdc_slide_type, cfg.extensions, mpp, checked)
    report = ingest_sources(list(sources), catalog, cfg, progress=progress, cohort=cohort)
    report.outcomes.extend(refused_outcome(source, reason) for source, reason in sources.refused)
    return report
