"""Open a slide with the reader for its format: ``open_slide(path) -> SlideReader``.

Order of the decision (a file is looked at once, when it is opened; reads then go straight to the reader, so an
OpenSlide slide pays nothing per tile for the choice):

1. a folder: a DICOM WSI series (``histcode.wsi.dicom``), read by OpenSlide;
2. a format refused by name (``histcode.wsi.formats.REFUSED``): UnsupportedFormatError with how to convert it;
3. OME-TIFF: ``image_reader`` (OpenSlide would see a one-level TIFF without a scale);
4. anything OpenSlide detects: OpenSlide;
5. other TIFFs (stripped, no tiles) and JPEG/PNG images: ``image_reader``, with an emulated pyramid.

With ``vendor`` (the catalog's column for a registered slide) the detection is skipped: the vendor names the
reader that opened it at ingest.
"""

from __future__ import annotations

import logging
from pathlib import Path

from histcode.wsi.dicom import dicom_series
from histcode.wsi.formats import czi_refusal, refusal, refused_format
from histcode.wsi.image_reader import READER_VENDORS, open_flat_image, open_tiff_image
from histcode.wsi.reader import OpenSlideReader, SlideReader, SlideReadError
from histcode.wsi.tiff_check import is_tiff

NOT_A_SLIDE = "not a whole-slide image format OpenSlide recognises"
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


def _is_ome(path: Path) -> bool:
    import tifffile

    quiet = logging.getLogger("tifffile")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a damaged TIFF is diagnosed by the reader that gets it, not warned about here
    try:
        with tifffile.TiffFile(path) as tif:
            return bool(tif.is_ome)
    except Exception:  # noqa: BLE001
        return False
    finally:
        quiet.setLevel(level)


def _openslide(path: Path) -> OpenSlideReader:
    if path.is_dir():
        return OpenSlideReader(path, open_with=dicom_series(path).open_with)
    return OpenSlideReader(path)


def open_slide(path: str | Path, vendor: str | None = None) -> SlideReader:
    """The slide at ``path`` (a file, or a DICOM series folder) behind the SlideReader protocol. Raises
    SlideReadError (UnsupportedFormatError for formats refused by name) with the file and the reason."""
    import openslide

    path = Path(path)
    if vendor is not None:
        if vendor not in READER_VENDORS:
            return _openslide(path)
        return open_flat_image(path) if not is_tiff(_head(path)) else open_tiff_image(path)
    fmt = refused_format(path)
    if fmt is not None:
        raise refusal(path, fmt)
    if path.is_dir():
        return _openslide(path)
    head = _head(path)
    tiff = is_tiff(head)
    if tiff and _is_ome(path):
        return open_tiff_image(path)
    detected = openslide.OpenSlide.detect_format(str(path))
    if detected is not None:
        try:
            return OpenSlideReader(path)
        except SlideReadError as exc:
            if detected == "zeiss":
                raise czi_refusal(path, str(exc).split(": ", 2)[-1]) from exc
            raise
    if tiff:
        return open_tiff_image(path)
    if head.startswith(JPEG_MAGIC) or head.startswith(PNG_MAGIC):
        return open_flat_image(path)
    raise SlideReadError(f"{path.name}: {NOT_A_SLIDE}")


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(16)
    except OSError as exc:
        raise SlideReadError(f"{path.name}: cannot read the file: {exc.strerror or exc}") from exc
