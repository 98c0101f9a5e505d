"""Small synthetic slides for tests, written with the same writers the demo uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from histcode.demo.tiff_writer import write_aperio_svs, write_generic_tiff

GLASS = (243, 241, 242)


def glass(height: int, width: int) -> np.ndarray:
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = GLASS
    return image


def textured_tissue(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """H&E-like purple/pink noise with texture (passes the blur QC)."""
    base = np.array([180, 110, 170], dtype=np.float32)
    noise = rng.normal(0, 25, size=(height, width, 3)).astype(np.float32)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def slide_with_rect(rng: np.random.Generator, size: tuple[int, int], rect: tuple[int, int, int, int], flat: bool = False) -> np.ndarray:
    """Glass of ``size`` (h, w) with tissue in ``rect`` = (x0, y0, x1, y1); flat tissue has no texture."""
    h, w = size
    image = glass(h, w)
    x0, y0, x1, y1 = rect
    if flat:
        image[y0:y1, x0:x1] = (180, 110, 170)
    else:
        image[y0:y1, x0:x1] = textured_tissue(rng, y1 - y0, x1 - x0)
    return image


def write_svs(path: Path, image: np.ndarray, mpp: float = 0.5, magnification: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_aperio_svs(path, image, mpp, magnification, 90, path.stem)


def write_tiff(path: Path, image: np.ndarray, mpp: float = 0.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_generic_tiff(path, image, mpp, 90)


def write_tiff_96dpi(path: Path, image: np.ndarray) -> Path:
    """A tiled TIFF that carries the 96-dpi default resolution some writers leave (264.58 um/px)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, tile=(256, 256), compression="jpeg", photometric="rgb", resolution=(96, 96),
                 resolutionunit="INCH", metadata=None)
    return path
