"""Slides that OpenSlide does not read, opened as a PyramidReader: OME-TIFF, TIFFs without tiles, JPEG and PNG.

OME-TIFF: the pyramid tifffile finds (SubIFDs, or one series per level), the scale from the OME-XML
``PhysicalSizeX``/``PhysicalSizeY`` in their unit, the objective's ``NominalMagnification``. OpenSlide would open
a tiled OME-TIFF as a one-level generic TIFF without a scale, so OME-TIFF is always read here.
Other TIFFs (stripped, as many scanners' exports and image tools write them, an SVS without tiles): every level
tifffile finds, the scale from an Aperio description (``MPP = ``) or the resolution tags (centimetre or inch).
JPEG and PNG: decoded whole on first read (Pillow refuses images above its decompression-bomb limit, 179
megapixels; such an image has to be converted to a tiled TIFF), the scale from their dpi when given.

The properties use OpenSlide's names (``openslide.mpp-x``, ``openslide.objective-power``, ``openslide.vendor``,
the ``openslide.level[i]`` geometry), so everything downstream reads one vocabulary.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from histcode.wsi.pyramid import PyramidReader
from histcode.wsi.reader import SlideReadError
from histcode.wsi.tiff_pages import SegmentCache, TiffPageLevel

log = logging.getLogger(__name__)

OME_TIFF, FLAT_IMAGE, TIFF_LEVELS = "ome-tiff", "image (no pyramid)", "tiff (tifffile)"
READER_VENDORS = frozenset({OME_TIFF, FLAT_IMAGE, TIFF_LEVELS})  # catalog vendors this module reads
SEGMENT_CACHE_BYTES = 96 << 20  # decoded strips/tiles kept per open slide (a grid row of a 40k-wide strip image)

MICRONS = {"µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "mm": 1e3, "cm": 1e4, "m": 1e6}
APERIO_FIELD = re.compile(r"\|\s*(MPP|AppMag)\s*=\s*([0-9.eE+-]+)")
RESUNIT_INCH, RESUNIT_CM, XRESOLUTION = 2, 3, 282


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def ome_scale(xml: str) -> dict[str, str]:
    """``openslide.mpp-x``/``-y`` and ``openslide.objective-power`` from the first Image of an OME-XML document."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        log.warning("OME-XML does not parse (%s); the scale is taken as missing", exc)
        return {}
    image = next((e for e in root if _local(e.tag) == "Image"), None)
    pixels = next((e for e in image if _local(e.tag) == "Pixels"), None) if image is not None else None
    out: dict[str, str] = {}
    if pixels is not None:
        for axis in ("X", "Y"):
            size = pixels.get(f"PhysicalSize{axis}")
            unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
            if size and unit in MICRONS:
                out[f"openslide.mpp-{axis.lower()}"] = repr(float(size) * MICRONS[unit])
    settings = next((e for e in image if _local(e.tag) == "ObjectiveSettings"), None) if image is not None else None
    objectives = [e for e in root.iter() if _local(e.tag) == "Objective"]
    chosen = [o for o in objectives if settings is not None and o.get("ID") == settings.get("ID")] or objectives[:1]
    if chosen and chosen[0].get("NominalMagnification"):
        out["openslide.objective-power"] = chosen[0].get("NominalMagnification")
    return out


def tiff_scale(page) -> dict[str, str]:
    """The scale of a non-OME TIFF: an Aperio description's ``MPP``/``AppMag``, else the resolution tags."""
    out: dict[str, str] = {}
    fields = dict(APERIO_FIELD.findall(page.description or ""))
    if "MPP" in fields:
        out["openslide.mpp-x"] = out["openslide.mpp-y"] = fields["MPP"]
    if "AppMag" in fields:
        out["openslide.objective-power"] = fields["AppMag"]
    if "openslide.mpp-x" not in out and XRESOLUTION in page.tags:  # no tag: no scale (not the 1-per-inch default)
        unit = {RESUNIT_INCH: 25400.0, RESUNIT_CM: 10000.0}.get(int(page.resolutionunit or 1))
        xres, yres = page.resolution
        if unit and xres > 0 and yres > 0:
            out["openslide.mpp-x"], out["openslide.mpp-y"] = repr(unit / xres), repr(unit / yres)
    return out


class _Channels:
    """Three one-sample pages (an OME-TIFF stored channel by channel) read as one RGB level."""

    def __init__(self, planes: list[TiffPageLevel]) -> None:
        self._planes = planes
        self.width, self.height, self.tile = planes[0].width, planes[0].height, planes[0].tile

    def region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        return np.stack([p.region(x, y, w, h)[..., 0] for p in self._planes], axis=-1)


def _levels_of(series, fd: int, path: Path, cache: SegmentCache) -> list:
    name = path.name
    axes = series.axes
    levels = []
    for i, level in enumerate(series.levels):
        pages = [p.aspage() if hasattr(p, "aspage") else p for p in level.pages if p is not None]  # TiffFrames too
        if axes in ("YXS", "YX") and pages:
            levels.append(TiffPageLevel(path, fd, pages[0], i, cache, name))
        elif axes == "CYX" and level.shape[0] == 3 and len(pages) == 3:
            levels.append(_Channels([TiffPageLevel(path, fd, p, (i, c), cache, name) for c, p in enumerate(pages)]))
        else:
            raise SlideReadError(f"{name}: image axes {axes} {tuple(level.shape)} are not one RGB or grey plane "
                                 "(a z-stack, time series or multichannel fluorescence image?)")
    keep = [levels[0]]
    for lv in levels[1:]:  # a pyramid gets smaller level by level; anything else is not a level
        if lv.width < keep[-1].width and lv.height < keep[-1].height:
            keep.append(lv)
    return keep


def open_tiff_image(path: Path) -> PyramidReader:
    """An OME-TIFF or a TIFF OpenSlide refused, as a PyramidReader. SlideReadError naming the reason."""
    import tifffile

    path = Path(path)
    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, OSError, struct.error) as exc:
        raise SlideReadError(f"{path.name}: not a TIFF tifffile can read: {exc}") from exc
    fd = os.open(path, os.O_RDONLY)

    def close() -> None:
        tif.close()
        os.close(fd)

    try:
        if not tif.series:
            raise SlideReadError(f"{path.name}: a TIFF with no image in it")
        ome = bool(tif.is_ome and tif.ome_metadata)
        series = tif.series[0]
        levels = _levels_of(series, fd, path, SegmentCache(SEGMENT_CACHE_BYTES))
        props = ome_scale(tif.ome_metadata) if ome else tiff_scale(series.levels[0].keyframe)
        vendor = OME_TIFF if ome else FLAT_IMAGE if len(levels) == 1 else TIFF_LEVELS
        props.update({"openslide.vendor": vendor, "histcode.reader": "tifffile",
                      "histcode.format": "OME-TIFF" if ome else "TIFF"})
        return PyramidReader(path, levels, props, on_close=close)
    except SlideReadError:
        close()
        raise
    except Exception as exc:  # noqa: BLE001 -- a malformed file surfaces as any of tifffile's errors
        close()
        raise SlideReadError(f"{path.name}: tifffile could not read its pages: {exc}") from exc


class _WholeImage:
    """A JPEG or PNG decoded whole on first read."""

    def __init__(self, path: Path, size: tuple[int, int]) -> None:
        self._path = path
        self.width, self.height = size
        self.tile = size
        self._pixels: np.ndarray | None = None

    def region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._pixels is None:
            from PIL import Image

            try:
                with Image.open(self._path) as im:
                    self._pixels = np.asarray(_on_white(im))
            except (OSError, Image.DecompressionBombError) as exc:
                raise SlideReadError(f"{self._path.name}: decoding failed: {exc}") from exc
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._pixels[y0:y1, x0:x1]
        return out


def _on_white(im):
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


FLAT_FORMATS = ("JPEG", "PNG")


def open_flat_image(path: Path) -> PyramidReader:
    """A JPEG or PNG as a PyramidReader; SlideReadError naming the reason."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            fmt, size, info = im.format, im.size, dict(im.info)
            Image._decompression_bomb_check(size)  # the limit Pillow applies when it decodes
    except Image.DecompressionBombError as exc:
        raise SlideReadError(
            f"{path.name}: {exc.args[0].split('could be')[0].strip(' ,')} -- too large to decode whole; convert it to a "
            "tiled pyramidal TIFF (`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg --Q 90`)") from exc
    except OSError as exc:
        raise SlideReadError(f"{path.name}: not an image Pillow can read: {exc}") from exc
    if fmt not in FLAT_FORMATS:
        raise SlideReadError(f"{path.name}: a {fmt} image; HistCode reads JPEG and PNG images besides slides")
    props = {"openslide.vendor": FLAT_IMAGE, "histcode.reader": "pillow", "histcode.format": fmt}
    dpi = info.get("dpi")
    if dpi and all(float(d) > 0 for d in dpi[:2]):
        props["openslide.mpp-x"], props["openslide.mpp-y"] = repr(25400 / float(dpi[0])), repr(25400 / float(dpi[1]))
    return PyramidReader(path, [_WholeImage(path, size)], props)
