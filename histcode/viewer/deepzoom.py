"""Deep Zoom tiles of registered slides, rendered with OpenSlide (``openslide.deepzoom``) and cached.

A slide is opened with ``histcode.wsi.dispatch.open_slide`` (any format HistCode reads) and handed to
``DeepZoomGenerator`` as an ``openslide.AbstractSlide`` (``histcode.wsi.openslide_view``).

A slide is opened once and kept (up to ``max_slides``, least recently used dropped first); rendered tiles are
kept as JPEG bytes (up to ``max_tiles``), so a tile asked for again (panning back, a second viewer) is served
from memory. Slides are named by catalog id only: the path comes from the catalog, never from a request.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import openslide
from openslide.deepzoom import DeepZoomGenerator

from histcode.wsi.dispatch import open_slide
from histcode.wsi.openslide_view import as_openslide

TILE_SIZE = 254  # + 2 x overlap = 256, a power of two, as openslide.deepzoom advises
OVERLAP = 1


class TileNotFound(LookupError):
    """A Deep Zoom level or tile outside the slide's pyramid."""


@dataclass(frozen=True)
class Pyramid:
    """What a Deep Zoom client needs to know of a slide (OpenSeadragon's tile source)."""

    width: int
    height: int
    tile_size: int
    overlap: int
    levels: int

    def as_tile_source(self) -> dict:
        return {"width": self.width, "height": self.height, "tileSize": self.tile_size,
                "tileOverlap": self.overlap, "minLevel": 0, "maxLevel": self.levels - 1}


class _LRU(OrderedDict):
    def __init__(self, capacity: int, on_evict=None) -> None:
        super().__init__()
        self.capacity, self.on_evict = capacity, on_evict

    def get_fresh(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            _, old = self.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old)


class DeepZoomTiles:
    """Deep Zoom pyramids and tiles of slides given by path (the caller resolves ids through the catalog)."""

    def __init__(self, max_slides: int = 16, max_tiles: int = 4096, quality: int = 80) -> None:
        self._lock = threading.Lock()
        # an evicted slide is not closed: a request may still be reading it; OpenSlide frees it when unreferenced
        self._slides: _LRU = _LRU(max_slides)
        self._tiles: _LRU = _LRU(max_tiles)
        self.quality = quality

    def _generator(self, path: str) -> DeepZoomGenerator:
        with self._lock:
            entry = self._slides.get_fresh(path)
            if entry is None:
                slide = as_openslide(open_slide(path))
                entry = (slide, DeepZoomGenerator(slide, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False))
                self._slides.put(path, entry)
            return entry[1]

    def pyramid(self, path: str) -> Pyramid:
        dz = self._generator(path)
        width, height = dz.level_dimensions[-1]
        return Pyramid(int(width), int(height), TILE_SIZE, OVERLAP, dz.level_count)

    def _cached(self, key: tuple, render) -> bytes:
        """The JPEG bytes under ``key``, rendered (``render() -> PIL image``) and kept on first request."""
        with self._lock:
            cached = self._tiles.get_fresh(key)
        if cached is not None:
            return cached
        buf = io.BytesIO()
        render().convert("RGB").save(buf, "JPEG", quality=self.quality)
        data = buf.getvalue()
        with self._lock:
            self._tiles.put(key, data)
        return data

    def tile(self, path: str, level: int, col: int, row: int) -> bytes:
        """JPEG bytes of one Deep Zoom tile; ``TileNotFound`` for a level or address outside the pyramid."""
        dz = self._generator(path)
        if not 0 <= level < dz.level_count:
            raise TileNotFound(f"level {level} is outside 0..{dz.level_count - 1}")
        cols, rows = dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileNotFound(f"tile ({col}, {row}) is outside level {level}'s {cols} x {rows} tiles")
        return self._cached((path, level, col, row), lambda: dz.get_tile(level, (col, row)))  # reads are thread-safe

    def region_jpeg(self, path: str, x: int, y: int, size: int, out_px: int = 128) -> bytes:
        """A square level-0 region (a tile of the grid) as a small JPEG, read at the level nearest ``out_px``."""
        def render():
            slide = self._slide(path)
            level = slide.get_best_level_for_downsample(max(1.0, size / out_px))
            side = max(1, int(round(size / slide.level_downsamples[level])))
            return slide.read_region((int(x), int(y)), level, (side, side)).convert("RGB").resize((out_px, out_px))

        return self._cached(("region", path, x, y, size, out_px), render)

    def thumbnail_jpeg(self, path: str, side: int = 160) -> bytes:
        return self._cached(("thumb", path, side), lambda: self._slide(path).get_thumbnail((side, side)))

    def _slide(self, path: str) -> openslide.AbstractSlide:
        self._generator(path)
        with self._lock:
            return self._slides.get_fresh(path)[0]

    def close(self) -> None:
        with self._lock:
            for slide, _ in self._slides.values():
                slide.close()
            self._slides.clear()
            self._tiles.clear()
