"""Simulated slide layouts: irregular tissue on glass, and tumour regions inside it.

Everything is drawn on a coarse grid (the mask resolution, e.g. 8 um/px) from smooth random fields, then the
tissue outline is refined to full resolution when the slide is composed. Tumour is decided per source-tile
cell, so the ground-truth tumour mask matches the pixels that were actually placed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Layout:
    tissue: np.ndarray  # float (h, w) in [0, 1] at mask resolution; > 0.5 is tissue
    tumour_cells: np.ndarray  # bool (rows, cols): cell holds tumour tiles
    tissue_cells: np.ndarray  # bool (rows, cols): cell touches tissue
    cell_px: int  # mask pixels per cell side

    def label_mask(self) -> np.ndarray:
        """uint8 (h, w): 0 glass, 1 benign tissue, 2 tumour (tumour cells restricted to tissue)."""
        tissue = self.tissue > 0.5
        tumour = np.kron(self.tumour_cells, np.ones((self.cell_px, self.cell_px), dtype=bool))
        tumour = tumour[: tissue.shape[0], : tissue.shape[1]]
        labels = tissue.astype(np.uint8)
        labels[tissue & tumour] = 2
        return labels

    def tumour_fraction(self) -> float:
        labels = self.label_mask()
        tissue = (labels > 0).sum()
        return float((labels == 2).sum() / tissue) if tissue else 0.0


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, standardised to mean 0 and unit variance."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-12)


def tissue_field(rng: np.random.Generator, shape: tuple[int, int], coverage: float) -> np.ndarray:
    """A soft tissue map covering about ``coverage`` of the canvas: a few irregular blobs away from the edges.

    The map is a smooth field plus an elliptical envelope per blob; its 0.5 level set is the tissue outline.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    envelope = np.full(shape, -np.inf)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        ry, rx = rng.uniform(0.25, 0.45) * h, rng.uniform(0.25, 0.45) * w
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
        envelope = np.maximum(envelope, 1.0 - (u * u + v * v))
    rough = smooth_field(rng, shape, sigma=max(h, w) / 14) * 0.45 + smooth_field(rng, shape, sigma=max(h, w) / 40) * 0.15
    score = envelope + rough
    border = min(h, w) * 0.04  # keep a margin of glass
    edge = np.minimum.reduce([yy, xx, h - 1 - yy, w - 1 - xx])
    score = np.where(edge < border, -np.inf, score)
    level = np.quantile(score[np.isfinite(score)], 1.0 - coverage)
    tissue = score > level
    tissue = ndimage.binary_opening(tissue, iterations=2)
    tissue = ndimage.binary_fill_holes(tissue)
    labels, n = ndimage.label(tissue)
    if n > 1:  # drop specks well below a tile in area
        sizes = ndimage.sum(tissue, labels, index=np.arange(1, n + 1))
        tissue = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.05 * sizes.max()))
    soft = ndimage.gaussian_filter(tissue.astype(np.float32), sigma=1.0)
    return np.clip(soft, 0.0, 1.0)


def make_layout(
    rng: np.random.Generator,
    cells: tuple[int, int],
    cell_px: int,
    tumour_fraction: float,
    coverage: float,
) -> Layout:
    """A layout of ``cells`` (rows, cols) source-tile cells, each ``cell_px`` mask pixels wide.

    ``tumour_fraction`` of the tissue cells (0 for a normal slide) form a contiguous-looking tumour region
    chosen as the top of a smooth random field.
    """
    rows, cols = cells
    shape = (rows * cell_px, cols * cell_px)
    tissue = tissue_field(rng, shape, coverage)
    per_cell = (tissue > 0.5).reshape(rows, cell_px, cols, cell_px).mean(axis=(1, 3))
    tissue_cells = per_cell > 0
    tumour_cells = np.zeros_like(tissue_cells)
    if tumour_fraction > 0 and tissue_cells.any():
        field = smooth_field(rng, (rows, cols), sigma=max(rows, cols) / 5)
        # weight by tissue so tumour sits inside tissue, not in cells that barely touch it
        candidates = np.flatnonzero(tissue_cells.ravel())
        order = candidates[np.argsort(-(field.ravel()[candidates] + per_cell.ravel()[candidates]))]
        weights = per_cell.ravel()[order]
        target = tumour_fraction * weights.sum()
        n = int(np.searchsorted(np.cumsum(weights), target)) + 1
        tumour_cells.ravel()[order[: max(1, min(n, len(order)))]] = True
    return Layout(tissue=tissue, tumour_cells=tumour_cells, tissue_cells=tissue_cells, cell_px=cell_px)
