"""Inspect one slide file: can it be opened and decoded, what is its geometry and scale, what is its hash.

Known-bad input (missing, empty, unreadable, not a slide, truncated, no usable scale) comes back as a record
with status 'failed' and the reason; it is not raised. Only unexpected OS errors propagate, so an orchestrator
can retry them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from histcode.config import IngestConfig
from histcode.ingest.sources import SlideSource
from histcode.store.records import FAILED, OK, SlideRecord
from histcode.wsi.dicom import is_dicom_folder
from histcode.wsi.dispatch import NOT_A_SLIDE, open_slide
from histcode.wsi.files import file_sha256, file_signature
from histcode.wsi.formats import UnsupportedFormatError, refused_format
from histcode.wsi.mpp import MppError, objective_power, resolve_mpp
from histcode.wsi.reader import SlideReader, SlideReadError
from histcode.wsi.tiff_check import check_tiff

log = logging.getLogger(__name__)

PROBE_SMALLEST_LEVEL_MAX_PX = 4096 * 4096


def _precheck(path: Path) -> str | None:
    """Reason the file cannot be a slide before OpenSlide sees it, or None."""
    if not path.exists():
        return "file not found"
    if path.is_dir():
        if is_dicom_folder(path) or refused_format(path):
            return None
        return "is a directory, neither a slide file nor a DICOM series folder"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with path.open("rb") as fh:
            fh.read(16)
    except PermissionError:
        return "cannot read the file: permission denied"
    except OSError as exc:
        return f"cannot read the file: {exc.strerror or exc}"
    return None


def _probe(reader: SlideReader, storage_tile: tuple[int, int]) -> None:
    """Decode the four corners of level 0 and the smallest level, which catches truncated and corrupt files
    whose headers still parse. Raises SlideReadError."""
    width, height = reader.level_dimensions[0]
    tw, th = storage_tile
    tw, th = min(tw, width), min(th, height)
    for x, y in {(0, 0), (width - tw, 0), (0, height - th), (width - tw, height - th)}:
        reader.read_region((x, y), 0, (tw, th))
    last = len(reader.level_dimensions) - 1
    lw, lh = reader.level_dimensions[last]
    if lw * lh <= PROBE_SMALLEST_LEVEL_MAX_PX:
        reader.read_region((0, 0), last, (lw, lh))


def _diagnose(path: Path, fallback: str) -> str:
    """Why a file could not be read: for TIFF-based files, where the structure breaks (truncation); otherwise
    ``fallback``. NDPI keeps 64-bit offsets in a private tag that a plain TIFF walk cannot read, so it is never
    second-guessed."""
    if path.is_dir() or path.suffix.lower() == ".ndpi":
        return fallback
    structure = check_tiff(path)
    if structure is None or not structure.problem:
        return fallback
    return structure.problem


def _int_prop(props, key: str) -> int | None:
    try:
        return int(props[key])
    except (KeyError, ValueError):
        return None


def inspect_slide(source: SlideSource, cfg: IngestConfig) -> SlideRecord:
    path = Path(source.path)
    record = SlideRecord(slide_id=source.slide_id, patient_id=source.patient_id, path=str(path), status=FAILED,
                         attributes=json.dumps(dict(source.attributes), sort_keys=True) if source.attributes else None)
    reason = _precheck(path)
    if reason:
        record.reason = reason
        return record
    record.file_size, record.file_mtime = file_signature(path)  # a DICOM folder: its files' total size, newest mtime

    try:
        reader = open_slide(path)
    except UnsupportedFormatError as exc:  # a known format no reader here decodes: its name and the way out
        record.reason = str(exc).split(": ", 1)[-1]  # not hashed: an ETS file runs to tens of gigabytes
        return record
    except SlideReadError as exc:
        why = str(exc).split(": ", 1)[-1]
        record.reason = _diagnose(path, why if why == NOT_A_SLIDE else f"cannot be opened: {why}")
        record.content_hash, record.hash_kind = file_sha256(path), "sha256"
        return record
    with reader:
        props = reader.properties
        quick = props.get("openslide.quickhash-1")
        record.content_hash, record.hash_kind = (quick, "quickhash-1") if quick else (file_sha256(path), "sha256")
        record.vendor = props.get("openslide.vendor")
        record.width, record.height = reader.level_dimensions[0]
        record.level_count = len(reader.level_dimensions)
        record.level_dimensions = [list(d) for d in reader.level_dimensions]
        record.level_downsamples = list(reader.level_downsamples)
        tile = (_int_prop(props, "openslide.level[0].tile-width"), _int_prop(props, "openslide.level[0].tile-height"))
        record.storage_tile = list(tile) if None not in tile else None
        record.objective = objective_power(props)
        if cfg.probe_reads:
            try:
                _probe(reader, (tile[0] or 256, tile[1] or 256))
            except SlideReadError as exc:
                record.reason = _diagnose(path, f"corrupt: {str(exc).split(': ', 1)[-1]}")
                return record
        try:
            mpp = resolve_mpp(props, source.mpp, cfg.plausible_mpp, cfg.max_anisotropy, cfg.default_mpp)
        except MppError as exc:
            record.reason = str(exc)
            return record
    record.mpp_x, record.mpp_y, record.mpp_source = mpp.x, mpp.y, mpp.source
    record.status, record.reason = OK, None
    log.debug("%s: %s %dx%d, %d levels, %.4g um/px (%s)", source.slide_id, record.vendor, record.width, record.height,
              record.level_count, mpp.x, mpp.source)
    return record

