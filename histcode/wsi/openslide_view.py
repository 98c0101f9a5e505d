"""Any SlideReader as an ``openslide.AbstractSlide``, for the code written against OpenSlide's Python API
(``openslide.deepzoom.DeepZoomGenerator`` in the viewer).

An OpenSlide slide is handed over as its own handle; any other reader is wrapped. Its reads are serialised with a
lock: the viewer serves tiles from several threads, and the image readers keep caches that are not thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
import openslide
from PIL import Image

from histcode.wsi.reader import OpenSlideReader, SlideReader


class ReaderSlide(openslide.AbstractSlide):
    def __init__(self, reader: SlideReader) -> None:
        super().__init__()
        self._reader = reader
        self._lock = threading.Lock()

    @classmethod
    def detect_format(cls, filename) -> str | None:  # noqa: ARG003 -- opened through histcode.wsi.dispatch
        return None

    def close(self) -> None:
        self._reader.close()

    @property
    def level_count(self) -> int:
        return len(self._reader.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._reader.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self._reader.level_downsamples)

    @property
    def properties(self) -> Mapping[str, str]:
        return self._reader.properties

    @property
    def associated_images(self) -> Mapping[str, Image.Image]:
        return {}

    def get_best_level_for_downsample(self, downsample: float) -> int:
        ds = self.level_downsamples
        return max((i for i, d in enumerate(ds) if d <= downsample), default=0)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        with self._lock:
            rgb = self._reader.read_region(location, level, size)
        rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, dtype=np.uint8)])
        return Image.fromarray(rgba, "RGBA")


def as_openslide(reader: SlideReader) -> openslide.AbstractSlide:
    return reader.slide if isinstance(reader, OpenSlideReader) else ReaderSlide(reader)
