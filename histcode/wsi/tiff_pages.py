"""Region reads from one TIFF page, tiled or stripped, decoding only the tiles or strips the region touches.

This is what lets a TIFF that OpenSlide refuses (stripped, or an OME-TIFF pyramid in SubIFDs) be read like a
slide: a 40,000-pixel-wide stripped image is never decoded whole for one tile, only the strips under it, and the
decoded segments are kept in a cache bounded in bytes (shared by the pages of one reader), so the tiles of one
grid row reuse the strips they share. Any compression tifffile + imagecodecs decode is accepted; samples are
turned into RGB uint8 (grey replicated, palette looked up, alpha composited over white, MinIsWhite inverted).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from histcode.wsi.reader import SlideReadError

MINISWHITE, MINISBLACK, RGB, PALETTE, YCBCR = 0, 1, 2, 3, 6
MAX_SEGMENT_BYTES = 512 << 20  # one decoded strip or tile larger than this cannot be read in parts


class SegmentCache:
    """Decoded segments, least recently used dropped first once ``max_bytes`` is exceeded."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple) -> np.ndarray | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: tuple, value: np.ndarray) -> None:
        self._items[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes


def page_problem(page) -> str | None:
    """Why a page cannot be read as a brightfield image, or None."""
    if page.bitspersample != 8 or page.dtype is None or np.dtype(page.dtype) != np.uint8:
        return (f"{page.bitspersample}-bit samples ({page.dtype}); HistCode reads 8-bit brightfield images "
                "(a fluorescence or 16-bit image?)")
    if page.imagedepth != 1:
        return "a volumetric TIFF page (ImageDepth > 1)"
    if page.photometric not in (MINISWHITE, MINISBLACK, RGB, PALETTE, YCBCR):
        return f"photometric interpretation {page.photometric!r} is not RGB, YCbCr, grey or palette"
    if page.samplesperpixel not in (1, 2, 3, 4):
        return f"{page.samplesperpixel} samples per pixel (a multichannel image?)"
    return None


class TiffPageLevel:
    """One TIFF page read as a level: ``region(x, y, w, h)`` in its own pixels, white outside the image."""

    def __init__(self, path: Path, fd: int, page, page_key: int, cache: SegmentCache, name: str) -> None:
        problem = page_problem(page)
        if problem:
            raise SlideReadError(f"{name}: {problem}")
        self._fd, self._page, self._key, self._cache, self._name = fd, page, page_key, cache, name
        self.width, self.height = page.imagewidth, page.imagelength
        if page.is_tiled:
            self.seg_w, self.seg_h = page.tilewidth, page.tilelength
        else:
            self.seg_w, self.seg_h = self.width, min(page.rowsperstrip or self.height, self.height)
        self.tile = (self.seg_w, self.seg_h)
        self._across = -(-self.width // self.seg_w)
        self._per_plane = self._across * -(-self.height // self.seg_h)
        self._planes = page.samplesperpixel if page.planarconfig == 2 else 1
        decoded = self.seg_w * self.seg_h * page.samplesperpixel
        if decoded > MAX_SEGMENT_BYTES:
            raise SlideReadError(
                f"{name}: one {'tile' if page.is_tiled else 'strip'} holds {self.seg_w}x{self.seg_h} pixels "
                f"({decoded >> 20} MiB decoded), too large to read in parts; convert the file to a tiled "
                "pyramidal TIFF (`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg --Q 90`)")
        self._offsets, self._counts = tuple(page.dataoffsets), tuple(page.databytecounts)
        self._colormap = page.colormap if page.photometric == PALETTE else None
        self._extra_alpha = bool(page.extrasamples) and page.samplesperpixel in (2, 4)

    def _segment(self, index: int) -> np.ndarray:
        """The decoded segment ``index`` of the first plane (all planes stacked as samples): (seg_h', seg_w', s)."""
        key = (self._key, index)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        parts = []
        for plane in range(self._planes):
            i = plane * self._per_plane + index
            offset, count = self._offsets[i], self._counts[i]
            if count == 0:  # a segment never written: empty (white once composited)
                parts.append(np.full((self.seg_h, self.seg_w, 1 if self._planes > 1 else self._page.samplesperpixel),
                                     255 if self._page.photometric != MINISWHITE else 0, np.uint8))
                continue
            try:
                data = os.pread(self._fd, count, offset)
                decoded, _, shape = self._page.decode(data, i, jpegtables=self._page.jpegtables)
                parts.append(np.asarray(decoded).reshape(shape[-3], shape[-2], shape[-1]))
            except Exception as exc:  # noqa: BLE001 -- imagecodecs raises its own error types
                raise SlideReadError(f"{self._name}: decoding segment {i} failed: {exc}") from exc
        segment = self._rgb(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1))
        self._cache.put(key, segment)
        return segment

    def _rgb(self, samples: np.ndarray) -> np.ndarray:
        photometric = self._page.photometric
        if self._colormap is not None:
            lut = (np.asarray(self._colormap, dtype=np.uint32).T >> 8).astype(np.uint8)  # 16-bit entries
            return np.ascontiguousarray(lut[samples[..., 0]])
        alpha = samples[..., -1:] if self._extra_alpha else None
        colour = samples[..., :-1] if self._extra_alpha else samples
        if photometric == MINISWHITE:
            colour = 255 - colour
        if colour.shape[-1] == 1:
            colour = np.repeat(colour, 3, axis=-1)
        if alpha is not None and alpha.min() < 255:  # unassociated alpha: composite over white
            a = alpha.astype(np.uint16)
            colour = ((colour.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        return np.ascontiguousarray(colour[..., :3])

    def region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return out
        for sy in range(y0 // self.seg_h, (y1 - 1) // self.seg_h + 1):
            for sx in range(x0 // self.seg_w, (x1 - 1) // self.seg_w + 1):
                seg = self._segment(sy * self._across + sx)
                left, top = sx * self.seg_w, sy * self.seg_h
                ax0, ay0 = max(x0, left), max(y0, top)
                ax1, ay1 = min(x1, left + seg.shape[1]), min(y1, top + seg.shape[0])
                if ax1 > ax0 and ay1 > ay0:
                    out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = seg[ay0 - top:ay1 - top, ax0 - left:ax1 - left]
        return out
