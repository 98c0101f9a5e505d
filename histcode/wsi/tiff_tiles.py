"""Direct decoding of tiled JPEG TIFF levels (Aperio SVS, generic tiled TIFF), bypassing OpenSlide's ARGB path.

OpenSlide decodes a stored JPEG tile to premultiplied ARGB, composites it with cairo and hands it to Python as
RGBA; for a grid-aligned tile almost all of that is overhead. Here the stored tile's bytes are decoded straight
to RGB with tifffile + imagecodecs (libjpeg-turbo, as in OpenSlide), which gives the same pixels (the test
suite compares them to OpenSlide's byte for byte) several times faster. Only the formats whose geometry
OpenSlide takes verbatim from the TIFF are eligible; everything else goes through OpenSlide.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from histcode.wsi.reader import SlideReadError

log = logging.getLogger(__name__)

DIRECT_VENDORS = frozenset({"aperio", "generic-tiff"})
JPEG, RGB, YCBCR = 7, 2, 6


class DirectTiffLevel:
    """Region reads from one tiled JPEG page of a TIFF, in that level's pixel coordinates."""

    def __init__(self, path: Path, page_index: int, cache_tiles: int = 32) -> None:
        import tifffile

        self._path = Path(path)
        self._tif = tifffile.TiffFile(path)
        self._page = self._tif.pages[page_index]
        self._decode = self._page.decode
        self._tables = self._page.jpegtables
        self._offsets, self._counts = tuple(self._page.dataoffsets), tuple(self._page.databytecounts)
        # tile bytes are read with pread on our own descriptor: no shared file position to race on
        self._fd = os.open(path, os.O_RDONLY)
        page = self._page
        self.width, self.height = page.imagewidth, page.imagelength
        self.tile_w, self.tile_h = page.tilewidth, page.tilelength
        self._tiles_across = -(-self.width // self.tile_w)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = cache_tiles

    def close(self) -> None:
        self._tif.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _tile(self, index: int) -> np.ndarray:
        hit = self._cache.get(index)
        if hit is not None:
            self._cache.move_to_end(index)
            return hit
        offset, count = self._offsets[index], self._counts[index]
        if count == 0:  # a tile the scanner never wrote: transparent in OpenSlide, white once composited
            tile = np.full((self.tile_h, self.tile_w, 3), 255, dtype=np.uint8)
        else:
            try:
                data = os.pread(self._fd, count, offset)
                decoded, _, shape = self._decode(data, index, jpegtables=self._tables)
                tile = np.asarray(decoded).reshape(shape[-3], shape[-2], shape[-1])
            except Exception as exc:  # noqa: BLE001 -- imagecodecs raises its own error types
                raise SlideReadError(f"{self._path.name}: decoding stored tile {index} failed: {exc}") from exc
        self._cache[index] = tile
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tile

    def region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB (h, w, 3) of the level at (x, y); outside the image is white, as OpenSlide composites it."""
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1):
            for tx in range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1):
                tile = self._tile(ty * self._tiles_across + tx)
                left, top = tx * self.tile_w, ty * self.tile_h
                sx0, sy0 = max(x0, left), max(y0, top)
                sx1, sy1 = min(x1, left + self.tile_w), min(y1, top + self.tile_h)
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[sy0 - top:sy1 - top, sx0 - left:sx1 - left]
        return out


def find_direct_level(path: Path, vendor: str | None, level_size: tuple[int, int]) -> int | None:
    """Index of the TIFF page holding an OpenSlide level of ``level_size`` if it can be decoded directly:
    an eligible vendor, tiled, 8-bit RGB/YCbCr JPEG, chunky. None otherwise."""
    if vendor not in DIRECT_VENDORS:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            for i, page in enumerate(tif.pages):
                if (page.imagewidth, page.imagelength) != tuple(level_size) or not page.is_tiled:
                    continue
                eligible = (
                    page.compression == JPEG
                    and page.photometric in (RGB, YCBCR)
                    and page.samplesperpixel == 3
                    and page.bitspersample == 8
                    and page.planarconfig == 1
                    and page.imagedepth == 1
                )
                return i if eligible else None
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        log.debug("%s: no direct TIFF path (%s)", path, exc)
    return None
