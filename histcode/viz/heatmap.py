"""Heatmaps: tile scores (attention, or a gene's predicted log2FC) painted over the slide thumbnail, with a
colour bar, as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from histcode.wsi.reader import OpenSlideReader, render_at_mpp  # noqa: E402

SIDE = 1200


def heatmap_png(slide: dict, xy: np.ndarray, size: int, scores: np.ndarray, title: str, label: str, path: Path,
                cmap: str = "inferno") -> Path:
    """``xy`` level-0 corners and ``size`` level-0 side of the scored tiles; ``scores`` one value per tile."""
    mpp = float(slide["mpp_x"])
    with OpenSlideReader(slide["path"]) as reader:
        thumb, (dx, dy) = render_at_mpp(reader, mpp, mpp * max(slide["width"], slide["height"]) / SIDE)
    grid = np.full(thumb.shape[:2], np.nan)
    for (x, y), s in zip(xy, scores):
        r0, c0 = int(y / dy), int(x / dx)
        grid[r0:r0 + max(1, int(size / dy)), c0:c0 + max(1, int(size / dx))] = s
    fig, ax = plt.subplots(figsize=(7, 7 * thumb.shape[0] / thumb.shape[1] + 0.6))
    ax.imshow(thumb)
    shown = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, alpha=0.55)
    ax.set_axis_off()
    ax.set_title(title.replace("$", r"\$"), fontsize=9)  # ids are text, never mathtext
    fig.colorbar(shown, ax=ax, fraction=0.035, pad=0.02, label=label)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
