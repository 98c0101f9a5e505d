"""A SlideReader over the levels a file stores, with the coarser levels it lacks emulated.

Tiling reads a low-resolution rendering for the tissue mask and tiles at the target mpp; on an image with no
pyramid (a stripped TIFF, a JPEG) both would otherwise decode level 0 at full size. Emulated levels are 4x box
reductions (the pyramids of the demo's writer and most scanners), added below the coarsest stored level while
the image is still larger than ``MIN_LEVEL_SIDE``. A read at an emulated level decodes its source region band by
band (``BAND_PIXELS`` source pixels at a time), so memory stays bounded whatever the request; a level small
enough (``level_cache_bytes``) is computed once, on first use, and kept.

Coordinates follow OpenSlide: ``location`` is in level-0 pixels, ``size`` in the level's pixels, and areas
outside the image are white.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

FACTOR = 4  # each emulated level is 4x coarser than the one above it
MIN_LEVEL_SIDE = 512  # no emulated level whose longer side would fall below this
BAND_PIXELS = 1 << 24  # source pixels decoded at once when reducing (48 MiB of RGB)


class StoredLevel(Protocol):
    width: int
    height: int
    tile: tuple[int, int]

    def region(self, x: int, y: int, w: int, h: int) -> np.ndarray: ...


@dataclass
class _Emulated:
    width: int
    height: int
    source: int  # index of the level it is reduced from
    factor: int  # its downsample relative to that level
    pixels: np.ndarray | None = None  # the whole level once computed (small levels only)


def box_reduce(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks (rounded); the array's sides are multiples of ``factor``."""
    h, w = pixels.shape[0] // factor, pixels.shape[1] // factor
    blocks = pixels[:h * factor, :w * factor].reshape(h, factor, w, factor, 3).astype(np.uint32)
    n = factor * factor
    return ((blocks.sum(axis=(1, 3)) + n // 2) // n).astype(np.uint8)


class PyramidReader:
    """SlideReader over ``stored`` levels (finest first) plus emulated coarser ones."""

    def __init__(self, path: Path, stored: list[StoredLevel], properties: dict[str, str],
                 on_close: Callable[[], None] | None = None, level_cache_bytes: int = 64 << 20) -> None:
        self.path = Path(path)
        self._stored = stored
        self._on_close = on_close
        self._cache_bytes = level_cache_bytes
        w0, h0 = stored[0].width, stored[0].height
        self._dims = [(lv.width, lv.height) for lv in stored]
        self._ds = [1.0] + [((w0 / lv.width) + (h0 / lv.height)) / 2 for lv in stored[1:]]
        self._emulated: dict[int, _Emulated] = {}
        src = len(stored) - 1
        w, h = self._dims[-1]
        factor = 1
        while max(w // FACTOR, h // FACTOR) >= MIN_LEVEL_SIDE:
            w, h, factor = w // FACTOR, h // FACTOR, factor * FACTOR
            index = len(self._dims)
            prev = self._emulated.get(index - 1)
            if prev is not None and prev.width * prev.height * 3 <= level_cache_bytes:
                self._emulated[index] = _Emulated(w, h, index - 1, FACTOR)  # from the kept level above
            else:
                self._emulated[index] = _Emulated(w, h, src, factor)
            self._dims.append((w, h))
            self._ds.append(self._ds[src] * factor)
        props = dict(properties)
        props["openslide.level-count"] = str(len(self._dims))
        for i, (w, h) in enumerate(self._dims):
            tile = stored[i].tile if i < len(stored) else (256, 256)
            props.update({f"openslide.level[{i}].width": str(w), f"openslide.level[{i}].height": str(h),
                          f"openslide.level[{i}].downsample": repr(self._ds[i]),
                          f"openslide.level[{i}].tile-width": str(tile[0]),
                          f"openslide.level[{i}].tile-height": str(tile[1])})
        props["histcode.emulated-levels"] = str(len(self._emulated))
        self._properties = props

    @property
    def properties(self) -> Mapping[str, str]:
        return self._properties

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._dims)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self._ds)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._dims[0]

    def _level_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB (h, w) of ``level`` at (x, y) in that level's pixels."""
        if level < len(self._stored):
            return self._stored[level].region(x, y, w, h)
        em = self._emulated[level]
        if em.pixels is None and em.width * em.height * 3 <= self._cache_bytes:
            em.pixels = self._reduce(em, 0, 0, em.width, em.height)
        if em.pixels is not None:
            out = np.full((h, w, 3), 255, dtype=np.uint8)
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, em.width), min(y + h, em.height)
            if x1 > x0 and y1 > y0:
                out[y0 - y:y1 - y, x0 - x:x1 - x] = em.pixels[y0:y1, x0:x1]
            return out
        return self._reduce(em, x, y, w, h)

    def _reduce(self, em: _Emulated, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Box-reduce the source region under (x, y, w, h) band by band."""
        f = em.factor
        out = np.empty((h, w, 3), dtype=np.uint8)
        rows = max(1, BAND_PIXELS // max(1, w * f * f))
        for r0 in range(0, h, rows):
            n = min(rows, h - r0)
            band = self._level_region(em.source, x * f, (y + r0) * f, w * f, n * f)
            out[r0:r0 + n] = box_reduce(band, f)
        return out

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self._ds[level]
        x, y = int(location[0] // ds), int(location[1] // ds)
        return self._level_region(level, x, y, int(size[0]), int(size[1]))

    def close(self) -> None:
        on_close = getattr(self, "_on_close", None)  # None too when __init__ raised before setting it
        if on_close is not None:
            self._on_close = None
            on_close()

    def __del__(self) -> None:  # a reader dropped unclosed (an evicted viewer slide) still frees its descriptor
        self.close()

    def __enter__(self) -> PyramidReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
