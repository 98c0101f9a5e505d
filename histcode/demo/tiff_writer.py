"""Write pyramidal, tiled, JPEG-compressed TIFFs that OpenSlide opens.

Two flavours: Aperio SVS (the ImageDescription carries ``AppMag`` and ``MPP``; a stripped thumbnail as the
second directory, as Aperio scanners write it) and generic tiled TIFF (scale in the resolution tags, in
pixels per centimetre). The file is written under a temporary name and renamed, so a crash never leaves a
half-written slide behind.

Either writer takes the image whole, as an array, or as ``Bands``: an image too large for memory (a 40x slide of
a scanner's size is 15 GB of pixels), read a row of storage tiles at a time while level 0 is written; the first
coarser level is box-filtered from each row as it goes by and the rest of the pyramid from that level.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import tifffile
from PIL import Image

STORAGE_TILE = 256


@runtime_checkable
class Bands(Protocol):
    """An RGB uint8 image of ``shape`` (h, w, 3) whose rows [y0, y1) come on request."""

    shape: tuple[int, int, int]

    def rows(self, y0: int, y1: int) -> np.ndarray: ...


def pyramid(image: np.ndarray, factors: tuple[int, ...]) -> list[np.ndarray]:
    """Levels of ``image`` at each downsample factor (box filter), level 0 first."""
    base = Image.fromarray(image)
    h, w = image.shape[:2]
    levels = []
    for f in factors:
        if f == 1:
            levels.append(image)
        else:
            size = (max(1, w // f), max(1, h // f))
            levels.append(np.asarray(base.resize(size, Image.Resampling.BOX)))
    return levels


def _factors(shape: tuple[int, int]) -> tuple[int, ...]:
    """1, 4, 16, ... while the level is still larger than one storage tile."""
    factors = [1]
    while max(shape) // (factors[-1] * 4) >= STORAGE_TILE:
        factors.append(factors[-1] * 4)
    return tuple(factors)


def _levels(image: np.ndarray | Bands) -> tuple[tuple[int, ...], dict, Callable[[], list[np.ndarray]]]:
    """The pyramid's downsample factors, what level 0 is written from (``TiffWriter.write``'s arguments: the
    array, or a tile iterator with its shape and dtype) and a function giving the coarser levels once level 0 has
    been written."""
    h, w = image.shape[:2]
    factors = _factors((h, w))
    if not isinstance(image, np.ndarray) and len(factors) == 1:  # no pyramid: small enough to take whole
        image = image.rows(0, h)
    if isinstance(image, np.ndarray):
        levels = pyramid(image, factors)
        return factors, {"data": levels[0]}, lambda: levels[1:]
    f = factors[1]
    first = np.empty((h // f, w // f, 3), dtype=np.uint8)

    def tiles() -> Iterator[np.ndarray]:
        for y0 in range(0, h, STORAGE_TILE):  # STORAGE_TILE is a multiple of every factor
            band = image.rows(y0, min(h, y0 + STORAGE_TILE))
            r0, r1 = y0 // f, min(h // f, (y0 + len(band)) // f)
            if r1 > r0:  # box filter over whole f x f blocks
                block = np.ascontiguousarray(band[:(r1 - r0) * f, :(w // f) * f])
                first[r0:r1] = np.asarray(Image.fromarray(block).resize((w // f, r1 - r0), Image.Resampling.BOX))
            for x0 in range(0, w, STORAGE_TILE):
                yield band[:, x0:x0 + STORAGE_TILE]

    return factors, {"data": tiles(), "shape": (h, w, 3), "dtype": np.uint8}, lambda: pyramid(first, tuple(g // f for g in factors[1:]))


def _jpeg(quality: int) -> dict:
    return {"compression": "jpeg", "compressionargs": {"level": quality}, "photometric": "rgb", "metadata": None,
            "maxworkers": min(4, os.cpu_count() or 1)}


def _bigtiff(image: np.ndarray | Bands) -> bool:
    return int(np.prod(image.shape)) > 2**31


def write_aperio_svs(path: Path, image: np.ndarray | Bands, mpp: float, magnification: int, quality: int,
                     name: str) -> Path:
    h, w = image.shape[:2]
    _, level0, coarser = _levels(image)
    description = (
        f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({STORAGE_TILE}x{STORAGE_TILE}) JPEG/RGB Q={quality}"
        f"|AppMag = {magnification}|MPP = {mpp:.4f}|Filename = {name}|ScanScope ID = HISTCODE-DEMO"
        "|Comment = simulated layout of real LC25000 tiles"
    )
    jpeg = _jpeg(quality)
    tmp = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=_bigtiff(image)) as tw:
        tw.write(**level0, tile=(STORAGE_TILE, STORAGE_TILE), description=description, **jpeg)
        levels = coarser()
        whole = level0["data"] if isinstance(level0["data"], np.ndarray) else levels[0]  # Bands: from level 1
        thumb = np.asarray(Image.fromarray(whole).resize((max(1, w // 32), max(1, h // 32)), Image.Resampling.BOX))
        tw.write(thumb, subfiletype=1, **jpeg)
        for level in levels:
            tw.write(level, tile=(STORAGE_TILE, STORAGE_TILE), subfiletype=1, **jpeg)
    os.replace(tmp, path)
    return path


def write_generic_tiff(path: Path, image: np.ndarray | Bands, mpp: float, quality: int) -> Path:
    factors, level0, coarser = _levels(image)
    jpeg = _jpeg(quality)

    def scale(f: int) -> dict:
        px_per_cm = 1e4 / (mpp * f)
        return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}

    tmp = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=_bigtiff(image)) as tw:
        tw.write(**level0, tile=(STORAGE_TILE, STORAGE_TILE), **scale(1), subfiletype=0, **jpeg)
        for f, level in zip(factors[1:], coarser()):
            tw.write(level, tile=(STORAGE_TILE, STORAGE_TILE), **scale(f), subfiletype=1, **jpeg)
    os.replace(tmp, path)
    return path
