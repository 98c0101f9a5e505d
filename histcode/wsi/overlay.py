"""QC pictures: the slide thumbnail with its tissue mask and tile grid drawn on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MAX_SIDE = 1600


def save_mask_png(mask: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask.astype(np.uint8) * 255)).save(path, compress_level=1)
    return path


def draw_qc_thumbnail(
    thumbnail: np.ndarray,
    thumb_downsample: tuple[float, float],
    mask: np.ndarray,
    kept: np.ndarray,
    rejected: np.ndarray,
    size: int,
    path: Path,
) -> Path:
    """Thumbnail (RGB at ``thumb_downsample`` of level 0) with tissue tinted green, kept tiles outlined in
    blue and QC-rejected tiles in red. ``kept`` / ``rejected`` are (N, 2) level-0 corners of side ``size``."""
    scale = min(1.0, MAX_SIDE / max(thumbnail.shape[:2]))
    h, w = thumbnail.shape[:2]
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    base = Image.fromarray(thumbnail).resize((out_w, out_h), Image.Resampling.BOX)
    tint = Image.fromarray((mask.astype(np.uint8) * 255)).resize((out_w, out_h), Image.Resampling.NEAREST)
    green = Image.new("RGB", (out_w, out_h), (0, 170, 60))
    image = Image.composite(Image.blend(base, green, 0.35), base, tint)
    draw = ImageDraw.Draw(image)
    px, py = scale / thumb_downsample[0], scale / thumb_downsample[1]
    for corners, colour in ((kept, (30, 60, 220)), (rejected, (220, 30, 30))):
        for x, y in corners:
            x0, y0 = x * px, y * py
            draw.rectangle([x0, y0, x0 + size * px - 1, y0 + size * py - 1], outline=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, compress_level=1)
    return path
