"""Simulated slide layouts: irregular tissue on glass, and tumour regions inside it.

Everything is drawn on a coarse grid (the mask resolution, e.g. 8 um/px) from smooth random fields, then the
tissue outline is refined to full resolution when the slide is composed. Tumour is decided per source-tile
cell, so the ground-truth tumour mask matches the pixels that were actually placed; it is placed anywhere in
the tissue, edges included, as a larger region or as one small focus.
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

    def tissue_share(self) -> np.ndarray:
        """float (rows, cols): the share of each cell that is tissue."""
        rows, cols = self.tumour_cells.shape
        tissue = self.tissue > 0.5
        return tissue.reshape(rows, self.cell_px, cols, self.cell_px).mean(axis=(1, 3))

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


def _grow_focus(field: np.ndarray, per_cell: np.ndarray, target: float) -> np.ndarray:
    """One contiguous focus: from the cell (at least 3/4 tissue where there is one) where ``field`` is highest,
    add the 4-neighbour with the highest field among cells at least half tissue, until the focus holds the
    tissue closest to ``target`` (in cells' worth)."""
    eligible = per_cell >= 0.5
    seeds = per_cell >= 0.75 if (per_cell >= 0.75).any() else eligible if eligible.any() else per_cell > 0
    focus = np.zeros_like(eligible)
    focus.flat[int(np.argmax(np.where(seeds, field, -np.inf)))] = True
    held = float(per_cell[focus].sum())
    while True:
        ring = ndimage.binary_dilation(focus) & ~focus & eligible
        if not ring.any():
            return focus
        nxt = int(np.argmax(np.where(ring, field, -np.inf)))
        if abs(held + per_cell.flat[nxt] - target) >= abs(held - target):
            return focus
        focus.flat[nxt] = True
        held += float(per_cell.flat[nxt])


def make_layout(
    rng: np.random.Generator,
    cells: tuple[int, int],
    cell_px: int,
    tumour_fraction: float,
    coverage: float,
    small_focus: bool = False,
) -> Layout:
    """A layout of ``cells`` (rows, cols) source-tile cells, each ``cell_px`` mask pixels wide.

    ``tumour_fraction`` of the tissue (0 for a normal slide) is tumour: the tissue cells where a smooth random
    field is highest, anywhere in the tissue, edges included (the field knows nothing of the outline, so
    "touches glass" says nothing about the class). A ``small_focus`` is one contiguous patch grown from the
    field's highest cell over cells that are at least half tissue (so that a tile of it survives tiling); it
    covers at least one cell.
    """
    rows, cols = cells
    shape = (rows * cell_px, cols * cell_px)
    tissue = tissue_field(rng, shape, coverage)
    per_cell = (tissue > 0.5).reshape(rows, cell_px, cols, cell_px).mean(axis=(1, 3))
    tissue_cells = per_cell > 0
    tumour_cells = np.zeros_like(tissue_cells)
    field = smooth_field(rng, (rows, cols), sigma=max(rows, cols) / 5)
    target = tumour_fraction * per_cell.sum()  # in cells' worth of tissue
    if tumour_fraction > 0 and small_focus and tissue_cells.any():
        tumour_cells = _grow_focus(field, per_cell, target)
    elif tumour_fraction > 0 and tissue_cells.any():
        candidates = np.flatnonzero(tissue_cells.ravel())
        order = candidates[np.argsort(-field.ravel()[candidates], kind="stable")]
        n = int(np.argmin(np.abs(np.cumsum(per_cell.ravel()[order]) - target))) + 1  # the closest to target
        tumour_cells.ravel()[order[:n]] = True
    return Layout(tissue=tissue, tumour_cells=tumour_cells, tissue_cells=tissue_cells, cell_px=cell_px)
