"""Tile grid maths in level-0 pixels: the physical tile size, grid positions and per-tile tissue fraction.

The grid starts at the level-0 origin, the same origin as the slide's storage tiles, so where the tile size
equals the storage tile size (256 px at 20x on most scanners) every read decodes one stored tile; grids
anchored at a tissue bounding box decode up to four (``benchmarks/tiling.py`` measures the difference).
Only whole tiles inside the slide are placed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def tile_size_level0(tile_px: int, target_mpp: float, slide_mpp: float) -> int:
    """Side of one tile in level-0 pixels: ``tile_px`` pixels at ``target_mpp`` cover this many slide pixels.
    256 px at 0.5 um/px is 256 px on a 0.5 um/px (20x) slide and 512 px on a 0.25 um/px (40x) slide."""
    if tile_px <= 0 or target_mpp <= 0 or slide_mpp <= 0:
        raise ValueError(f"tile_px, target_mpp and slide_mpp must be positive: {tile_px}, {target_mpp}, {slide_mpp}")
    return max(1, round(tile_px * target_mpp / slide_mpp))


def grid_positions(width: int, height: int, size: int, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Top-left corners (x, y) of the whole tiles of side ``size`` that fit in a ``width`` x ``height`` slide,
    row-major, as an int64 array of shape (N, 2)."""
    ox, oy = origin
    nx = max(0, (width - ox) // size)
    ny = max(0, (height - oy) // size)
    xs = ox + size * np.arange(nx, dtype=np.int64)
    ys = oy + size * np.arange(ny, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.reshape(-1), gy.reshape(-1)], axis=1)


def _integral(mask: np.ndarray) -> np.ndarray:
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    table[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), axis=0), axis=1)
    return table


def _integral_at(table: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Area of the mask in [0, u) x [0, v) for fractional mask coordinates. The mask is constant per pixel,
    so its integral is bilinear inside each pixel and bilinear interpolation of the table is exact."""
    h, w = table.shape[0] - 1, table.shape[1] - 1
    u = np.clip(u, 0, w)
    v = np.clip(v, 0, h)
    i0 = np.minimum(np.floor(u).astype(np.int64), max(w - 1, 0))
    j0 = np.minimum(np.floor(v).astype(np.int64), max(h - 1, 0))
    fu, fv = u - i0, v - j0
    s00 = table[j0, i0]
    s01 = table[j0, i0 + 1]
    s10 = table[j0 + 1, i0]
    s11 = table[j0 + 1, i0 + 1]
    return s00 * (1 - fu) * (1 - fv) + s01 * fu * (1 - fv) + s10 * (1 - fu) * fv + s11 * fu * fv


def tissue_fractions(mask: np.ndarray, downsample: float | tuple[float, float], positions: np.ndarray,
                     size: int) -> np.ndarray:
    """Fraction of each level-0 square (x, y, size) covered by tissue, from a mask at ``downsample`` (one
    factor, or (x, y) factors when the mask's aspect ratio is not exactly the slide's).

    Exact for the piecewise-constant mask, including tiles that straddle mask pixels; area outside the mask
    counts as background.
    """
    if positions.size == 0:
        return np.zeros(0, dtype=np.float64)
    dx, dy = (downsample, downsample) if np.isscalar(downsample) else downsample
    table = _integral(mask)
    x0 = positions[:, 0] / dx
    y0 = positions[:, 1] / dy
    x1 = (positions[:, 0] + size) / dx
    y1 = (positions[:, 1] + size) / dy
    area = (
        _integral_at(table, x1, y1) - _integral_at(table, x0, y1) - _integral_at(table, x1, y0) + _integral_at(table, x0, y0)
    )
    return np.clip(area / ((size / dx) * (size / dy)), 0.0, 1.0)


@dataclass(frozen=True)
class Grid:
    """A slide's accepted tiles on their regular grid: level-0 corners, one side, the (row, col) cell of each
    tile (used to paint tiles at tile resolution: the static heatmaps, the viewer's overlays)."""

    tile_ids: list[str]
    xy: np.ndarray  # (n, 2) level-0 corners
    size: int
    origin: tuple[int, int]
    shape: tuple[int, int]  # (rows, cols) of cells covering every tile

    @property
    def cells(self) -> np.ndarray:
        """(n, 2) (row, col) of each tile."""
        ox, oy = self.origin
        return np.stack([(self.xy[:, 1] - oy) // self.size, (self.xy[:, 0] - ox) // self.size], axis=1).astype(int)

    def index_at(self, x: float, y: float) -> int | None:
        inside = ((self.xy[:, 0] <= x) & (x < self.xy[:, 0] + self.size) &
                  (self.xy[:, 1] <= y) & (y < self.xy[:, 1] + self.size))
        hit = np.flatnonzero(inside)
        return int(hit[0]) if hit.size else None


def grid_of(tile_ids: list[str], xy: np.ndarray, size: int) -> Grid:
    xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
    if not len(xy):
        return Grid([], xy, int(size), (0, 0), (0, 0))
    origin = (int(xy[:, 0].min() % size), int(xy[:, 1].min() % size))
    rows = int((xy[:, 1].max() - origin[1]) // size) + 1
    cols = int((xy[:, 0].max() - origin[0]) // size) + 1
    return Grid(list(tile_ids), xy, int(size), origin, (rows, cols))
