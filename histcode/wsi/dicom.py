"""DICOM WSI slides: a folder of instances of one series (one file per pyramid level, plus label and overview).

OpenSlide 4 reads DICOM WSI itself: opened on any file of the series, it collects the other files of the same
SeriesInstanceUID in that folder. HistCode therefore treats the folder as the slide (its path in the catalog,
its id the folder's name) and hands OpenSlide one of its files. DICOM files are recognised by their preamble
(``DICM`` at byte 128), with or without a ``.dcm`` extension; PACS exports often have none.

Which series a file belongs to is read with pydicom when it is installed (the ``dicom`` extra): a folder holding
two series is then refused with the reason, rather than read as whichever series OpenSlide happens to open.
Without pydicom the folder is taken as one series and OpenSlide decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from histcode.wsi.reader import SlideReadError

log = logging.getLogger(__name__)

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def is_dicom_file(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _candidates(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".dcm", "") and p.is_file())
    except OSError:
        return []


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder``, sorted by name."""
    return [p for p in _candidates(folder) if is_dicom_file(p)]


def is_dicom_folder(folder: Path) -> bool:
    """Whether ``folder`` directly holds a DICOM file (a directory scan asks this of every folder: it stops at the
    first one)."""
    return folder.is_dir() and any(is_dicom_file(p) for p in _candidates(folder))


@dataclass(frozen=True)
class DicomSeries:
    folder: Path
    files: tuple[Path, ...]
    open_with: Path  # the file OpenSlide is opened on


def _series_uids(files: list[Path]) -> dict[Path, tuple[str | None, str | None]] | None:
    """(SOP class, SeriesInstanceUID) of each file, or None when pydicom is not installed."""
    try:
        import pydicom
    except ImportError:
        log.debug("pydicom not installed: the series of a DICOM folder are not told apart")
        return None
    out = {}
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID", "SeriesInstanceUID"])
            out[f] = (str(ds.get("SOPClassUID", "")) or None, str(ds.get("SeriesInstanceUID", "")) or None)
        except Exception as exc:  # noqa: BLE001 -- pydicom raises many types on a damaged file
            log.debug("%s: pydicom could not read its header (%s)", f, exc)
            out[f] = (None, None)
    return out


def dicom_series(folder: Path) -> DicomSeries:
    """The one WSI series of ``folder``. Raises SlideReadError saying what the folder holds instead."""
    files = dicom_files(folder)
    if not files:
        raise SlideReadError(f"{folder.name}: a folder with no DICOM files in it")
    uids = _series_uids(files)
    if uids is not None:
        wsi = [f for f in files if uids[f][0] == WSI_SOP_CLASS]
        if not wsi:
            classes = sorted({c for c, _ in uids.values() if c})
            raise SlideReadError(f"{folder.name}: DICOM, but no VL Whole Slide Microscopy instance "
                                 f"(SOP classes {', '.join(classes) or 'unreadable'}): not a slide")
        series = sorted({uids[f][1] for f in wsi if uids[f][1]})
        if len(series) > 1:
            raise SlideReadError(f"{folder.name}: holds {len(series)} DICOM WSI series ({', '.join(series)}); "
                                 "put each series in a folder of its own (one folder = one slide)")
        files = wsi
    return DicomSeries(folder, tuple(files), files[0])
