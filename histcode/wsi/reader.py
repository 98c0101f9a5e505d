"""Slide access behind a small protocol, with OpenSlide as the main implementation.

``histcode.wsi.dispatch.open_slide`` picks the reader for a file (OpenSlide, or ``image_reader`` for OME-TIFF and
images without a pyramid); open slides through it rather than through a reader class.

One handle per process: open a reader inside each worker, never share one across a fork.
Pixels come back as RGB uint8 arrays (H, W, 3); transparent areas (outside the scanned region) are white.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from histcode.errors import HistcodeError


class SlideReadError(HistcodeError):
    """A slide could not be opened or decoded; the message says which file and why."""


class SlideReader(Protocol):
    path: Path

    @property
    def properties(self) -> Mapping[str, str]: ...

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    def level_downsamples(self) -> tuple[float, ...]: ...

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray: ...

    def close(self) -> None: ...


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide returns premultiplied RGBA; composite it over white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = rgb.astype(np.uint16) + (255 - alpha.astype(np.uint16))
    return np.minimum(out, 255).astype(np.uint8)


class OpenSlideReader:
    """SlideReader over openslide.OpenSlide. ``open_with``: the file OpenSlide opens when ``path`` is not itself
    one (a DICOM series folder: one of its instances)."""

    def __init__(self, path: str | Path, open_with: str | Path | None = None) -> None:
        import openslide

        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(open_with or self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideReadError(f"{self.path.name}: not a whole-slide image OpenSlide recognises") from exc
        except openslide.OpenSlideError as exc:
            raise SlideReadError(f"{self.path.name}: OpenSlide could not open it: {exc}") from exc

    @property
    def properties(self) -> Mapping[str, str]:
        return self._slide.properties

    @property
    def slide(self):
        """The openslide.OpenSlide handle (for openslide.deepzoom)."""
        return self._slide

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._slide.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self._slide.level_downsamples)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        import openslide

        try:
            region = self._slide.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self.path.name}: decoding level {level} at {location} size {size} failed: {exc}"
            ) from exc
        return rgba_to_rgb_on_white(np.asarray(region))

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> OpenSlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def best_level(downsamples: tuple[float, ...], wanted: float, tolerance: float = 0.01) -> int:
    """The coarsest level whose downsample does not exceed ``wanted`` (within a relative tolerance), so that
    reading it and resizing down never upsamples."""
    best = 0
    for i, ds in enumerate(downsamples):
        if ds <= wanted * (1 + tolerance) and ds >= downsamples[best]:
            best = i
    return best


def resize_rgb(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (width, height); box filter when shrinking (area average), bilinear when growing."""
    h, w = pixels.shape[:2]
    if (w, h) == size:
        return pixels
    shrinking = w >= size[0] and h >= size[1]
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(pixels).resize(size, method))


@dataclass(frozen=True)
class RegionPlan:
    """How one level-0 square of ``size_l0`` pixels is read: from ``level`` at ``read_px``, then resized."""

    level: int
    read_px: int
    out_px: int


def plan_read(downsamples: tuple[float, ...], size_l0: int, out_px: int) -> RegionPlan:
    level = best_level(downsamples, size_l0 / out_px)
    read_px = max(1, round(size_l0 / downsamples[level]))
    return RegionPlan(level=level, read_px=read_px, out_px=out_px)


def read_square(reader: SlideReader, x: int, y: int, plan: RegionPlan) -> np.ndarray:
    """The level-0 square at (x, y) as an (out_px, out_px, 3) array, read at the planned level."""
    region = reader.read_region((x, y), plan.level, (plan.read_px, plan.read_px))
    return resize_rgb(region, (plan.out_px, plan.out_px))


def render_at_mpp(
    reader: SlideReader, slide_mpp: float, target_mpp: float, max_strip_pixels: int = 16_000_000
) -> tuple[np.ndarray, tuple[float, float]]:
    """The whole slide rendered at about ``target_mpp`` (never finer than level 0), from the best level.

    Large levels are read in horizontal strips so memory stays bounded on slides without a pyramid.
    Returns the RGB image and its exact (x, y) downsample relative to level 0 (rounding the output size makes
    the two differ slightly; both are needed to map back to level-0 coordinates).
    """
    width, height = reader.level_dimensions[0]
    wanted = max(target_mpp / slide_mpp, 1.0)
    level = best_level(reader.level_downsamples, wanted)
    lw, lh = reader.level_dimensions[level]
    out_w = max(1, round(width / wanted))
    out_h = max(1, round(height / wanted))
    rows_per_out = lh / out_h  # level rows per output row
    strip_out_rows = max(1, int(max_strip_pixels / max(lw, 1) / max(rows_per_out, 1e-9)))
    strips = []
    ds = reader.level_downsamples[level]
    for r0 in range(0, out_h, strip_out_rows):
        r1 = min(out_h, r0 + strip_out_rows)
        y0 = int(np.floor(r0 * rows_per_out))
        y1 = min(lh, max(y0 + 1, int(np.ceil(r1 * rows_per_out))))
        region = reader.read_region((0, round(y0 * ds)), level, (lw, y1 - y0))
        strips.append(resize_rgb(region, (out_w, r1 - r0)))
    return np.concatenate(strips, axis=0), (width / out_w, height / out_h)
