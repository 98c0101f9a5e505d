"""What to ingest: slide files from paths and directories, or a manifest CSV, each with its accession.

A directory is searched for files with a slide extension (``ingest.extensions``), for files of the formats
refused by name (``histcode.wsi.formats``: reported with what to convert them with, never skipped in silence)
and for DICOM WSI series folders, each one slide whose id is the folder's name.

Manifest columns: ``path`` (required; relative paths are relative to the manifest), ``slide_id`` (default: the
file stem), ``patient_id`` (default: the TCGA patient of the slide id, else the slide id), ``mpp``
(optional, um/px, for slides whose files carry no usable scale) and ``cohort`` (optional; default: the command's
cohort). Any other column (a label, a site, a stain) is kept as a slide attribute in the catalog
(``slides.attributes``, JSON) and can be used in SQL and filters.

Slide ids are the user's accessions and are kept as given (dots, quotes, any script); only ids that cannot
name anything are refused: empty ones and ones with control characters. Wherever a file is named after a
slide, ``histcode.workspace.file_stem`` maps the id to a safe name.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from histcode.errors import HistcodeError
from histcode.store.records import is_path_attribute
from histcode.wsi.dicom import is_dicom_folder
from histcode.wsi.formats import REFUSED_EXTENSIONS

log = logging.getLogger(__name__)

TCGA_PATIENT = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(-|$)", re.IGNORECASE)


class ManifestError(HistcodeError, ValueError):
    """The manifest cannot be used; the message names the file, row and column."""


MAX_ID_CHARS = 1024
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` cannot be used as a slide accession, or None."""
    if not slide_id.strip():
        return "slide_id is empty"
    if CONTROL.search(slide_id):
        return f"slide_id {slide_id!r} holds control characters (tabs, newlines, ...)"
    if len(slide_id) > MAX_ID_CHARS:
        return f"slide_id {slide_id[:40]!r}... is {len(slide_id)} characters long (at most {MAX_ID_CHARS})"
    return None


@dataclass(frozen=True)
class SlideSource:
    path: Path
    slide_id: str
    patient_id: str
    mpp: float | None = None
    attributes: tuple[tuple[str, str], ...] = ()  # the manifest's extra columns, in column order
    cohort: str | None = None  # None: the cohort the command ingests into


MANIFEST_COLUMNS = ("path", "slide_id", "patient_id", "mpp", "cohort")


def patient_of(slide_id: str) -> str:
    """TCGA barcodes map to their patient (``TCGA-XX-XXXX``); any other id is its own patient."""
    match = TCGA_PATIENT.match(slide_id)
    return match.group(1).upper() if match else slide_id


def slide_id_of(path: Path) -> str:
    """The file's stem (an OME-TIFF's without ``.ome``); a DICOM series folder's name."""
    name = path.name
    if path.is_dir() and path.suffix.lower() not in REFUSED_EXTENSIONS:
        return name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _inside_vsi(f: Path) -> bool:
    """An ETS file of a VSI slide (``name.vsi`` beside the folder ``_name_/`` that holds its ``.ets`` files): the
    .vsi is reported, not each of its pixel files."""
    for parent in f.parents:
        if parent.name.startswith("_") and parent.name.endswith("_") and len(parent.name) > 2:
            if (parent.parent / f"{parent.name[1:-1]}.vsi").exists():
                return True
    return False


def _scan(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Slides below ``folder``: files with a slide extension, files of formats refused by name (so they are
    reported with what to convert them with, not skipped) and DICOM series folders (one slide each, never one per
    instance), sorted."""
    found = []
    for d in sorted([folder, *(p for p in folder.rglob("*") if p.is_dir())]):
        if is_dicom_folder(d) or d.suffix.lower() in REFUSED_EXTENSIONS:  # DICOM, OME-Zarr
            found.append(d)  # and any slide files beside its instances, below
        for f in sorted(p for p in d.iterdir() if p.is_file()):
            suffix = f.suffix.lower()
            if suffix in extensions or (suffix in REFUSED_EXTENSIONS and not (suffix == ".ets" and _inside_vsi(f))):
                found.append(f)
    return found


def expand_paths(paths: list[Path], extensions: tuple[str, ...]) -> list[Path]:
    """Files as given (whatever their extension, so a wrong file gets a reason rather than silence) and, for
    directories, the slides below them (see ``_scan``); a directory that is itself a DICOM series is one slide."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            below = _scan(p, extensions)
            if not below:
                log.warning("%s: no files with a slide extension (%s) and no DICOM series", p, ", ".join(extensions))
            found.extend(below)
        else:
            found.append(p)
    return found


def sources_from_paths(paths: list[Path], extensions: tuple[str, ...], mpp: float | None = None) -> list[SlideSource]:
    out = []
    for f in expand_paths(paths, extensions):
        sid = slide_id_of(f)
        out.append(SlideSource(path=f.expanduser().absolute(), slide_id=sid, patient_id=patient_of(sid), mpp=mpp))
    return out


def read_manifest(manifest: Path, mpp: float | None = None) -> list[SlideSource]:
    """Sources from a manifest CSV; ``mpp`` fills rows whose mpp cell is empty."""
    if not manifest.is_file():
        raise ManifestError(f"manifest {manifest}: file not found")
    with manifest.open(newline="", encoding="utf-8-sig") as fh:  # tolerate Excel's byte-order mark
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ManifestError(f"manifest {manifest}: needs a 'path' column (has {reader.fieldnames})")
        rows = list(reader)
    out = []
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        raw_path = (row.get("path") or "").strip()
        if not raw_path:
            raise ManifestError(f"manifest {manifest}, line {i}: empty path")
        path = Path(raw_path).expanduser()
        if not path.is_absolute():
            path = manifest.parent / path
        sid = (row.get("slide_id") or "").strip() or slide_id_of(path)
        pid = (row.get("patient_id") or "").strip() or patient_of(sid)
        cell = (row.get("mpp") or "").strip()
        try:
            row_mpp = float(cell) if cell else mpp
        except ValueError as exc:
            raise ManifestError(f"manifest {manifest}, line {i}: mpp {cell!r} is not a number") from exc
        extra = tuple((k, _attribute(k, (v or "").strip(), manifest.parent)) for k, v in row.items()
                      if k and k not in MANIFEST_COLUMNS and (v or "").strip())
        cohort = (row.get("cohort") or "").strip() or None
        out.append(SlideSource(path=path.absolute(), slide_id=sid, patient_id=pid, mpp=row_mpp, attributes=extra,
                               cohort=cohort))
    return out


def _attribute(key: str, value: str, base: Path) -> str:
    """Attribute values that name files (``mask`` or ``*_path``) are resolved like ``path``: relative to the
    manifest."""
    if is_path_attribute(key):
        p = Path(value).expanduser()
        return str((p if p.is_absolute() else base / p).absolute())
    return value


def split_duplicates(sources: list[SlideSource]) -> tuple[list[SlideSource], list[tuple[SlideSource, str]]]:
    """Keep the first source of each slide_id; later ones come back with the reason they were refused."""
    seen: dict[str, SlideSource] = {}
    kept, refused = [], []
    for s in sources:
        if s.slide_id in seen:
            if seen[s.slide_id].path == s.path:
                continue  # the same file named twice
            refused.append((s, f"duplicate slide_id {s.slide_id!r}: also given for {seen[s.slide_id].path}"))
        else:
            seen[s.slide_id] = s
            kept.append(s)
    return kept, refused
