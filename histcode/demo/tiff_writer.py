"""Write pyramidal, tiled, JPEG-compressed TIFFs that OpenSlide opens.

Two flavours: Aperio SVS (the ImageDescription carries ``AppMag`` and ``MPP``; a stripped thumbnail as the
second directory, as Aperio scanners write it) and generic tiled TIFF (scale in the resolution tags, in
pixels per centimetre). The file is written under a temporary name and renamed, so a crash never leaves a
half-written slide behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

STORAGE_TILE = 256


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


def _jpeg(quality: int) -> dict:
    return {"compression": "jpeg", "compressionargs": {"level": quality}, "photometric": "rgb", "metadata": None,
            "maxworkers": min(4, os.cpu_count() or 1)}


def write_aperio_svs(path: Path, image: np.ndarray, mpp: float, magnification: int, quality: int, name: str) -> Path:
    h, w = image.shape[:2]
    levels = pyramid(image, _factors((h, w)))
    description = (
        f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({STORAGE_TILE}x{STORAGE_TILE}) JPEG/RGB Q={quality}"
        f"|AppMag = {magnification}|MPP = {mpp:.4f}|Filename = {name}|ScanScope ID = HISTCODE-DEMO"
        "|Comment = simulated layout of real LC25000 tiles"
    )
    thumb = np.asarray(Image.fromarray(image).resize((max(1, w // 32), max(1, h // 32)), Image.Resampling.BOX))
    jpeg = _jpeg(quality)
    tmp = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tw:
        tw.write(levels[0], tile=(STORAGE_TILE, STORAGE_TILE), description=description, **jpeg)
        tw.write(thumb, subfiletype=1, **jpeg)
        for level in levels[1:]:
            tw.write(level, tile=(STORAGE_TILE, STORAGE_TILE), subfiletype=1, **jpeg)
    os.replace(tmp, path)
    return path


def write_generic_tiff(path: Path, image: np.ndarray, mpp: float, quality: int) -> Path:
    h, w = image.shape[:2]
    factors = _factors((h, w))
    jpeg = _jpeg(quality)
    tmp = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tw:
        for i, (f, level) in enumerate(zip(factors, pyramid(image, factors))):
            px_per_cm = 1e4 / (mpp * f)
            tw.write(
                level, tile=(STORAGE_TILE, STORAGE_TILE), resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1, **jpeg,
            )
    os.replace(tmp, path)
    return path
