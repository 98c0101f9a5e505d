"""Overlay pictures at tile resolution: one PNG pixel (or a few) per grid cell, placed over the slide by the
viewer and stretched with nearest-neighbour sampling, so a tile's colour covers exactly that tile.

Score layers take their colours from ``histcode.viz.colours`` (the same map and transparency as the static
heatmaps: low scores transparent, the tissue visible under the colour).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from histcode.viewer.cohort import Layer
from histcode.viz.colours import colour_stops, css_gradient, score_limits, tile_rgba
from histcode.wsi.grid import Grid

GRID_CELL_PX = 8  # pixels per cell of the tile-grid picture (a 1 px outline each)
TRUTH_RGBA = (230, 30, 60, 140)
TISSUE_RGBA = (40, 160, 90, 110)


def _png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba, dtype=np.uint8), "RGBA").save(buf, "PNG", optimize=False)
    return buf.getvalue()


def placement(grid: Grid, width: int, height: int) -> dict:
    """Where the grid picture goes, in OpenSeadragon viewport units (the slide's width is 1)."""
    rows, cols = grid.shape
    ox, oy = grid.origin
    return {"x": ox / width, "y": oy / width, "width": cols * grid.size / width, "height": rows * grid.size / width,
            "rows": rows, "cols": cols, "tile_size": grid.size}


def layer_png(layer: Layer) -> bytes:
    """The layer's tiles coloured by score (truth: tumour tiles in one colour), other cells transparent."""
    rows, cols = layer.grid.shape
    out = np.zeros((rows, cols, 4), dtype=np.uint8)
    cells = layer.grid.cells
    if layer.name == "truth":
        colours = np.zeros((len(layer.scores), 4), dtype=np.uint8)
        colours[layer.scores > 0.5] = TRUTH_RGBA
    else:
        colours = tile_rgba(layer.scores, layer.kind)
    out[cells[:, 0], cells[:, 1]] = colours
    return _png(out)


def layer_legend(layer: Layer) -> dict:
    """The colour bar of a layer: its label, limits and a CSS gradient (low limit on the left)."""
    if layer.name == "truth":
        r, g, b, a = TRUTH_RGBA
        return {"label": "tumour in the mask", "low": 0, "high": 1,
                "gradient": f"linear-gradient(to right, rgba(0, 0, 0, 0), rgba({r}, {g}, {b}, {a / 255:.3f}))"}
    low, high = score_limits(layer.scores, layer.kind)
    return {"label": layer.label, "low": float(low), "high": float(high),
            "gradient": css_gradient(colour_stops(layer.kind, (low, high)), "to right")}


def grid_png(grid: Grid) -> bytes:
    """Every tile of the grid outlined (1 px of ``GRID_CELL_PX``), cells without a tile left empty."""
    rows, cols = grid.shape
    cell = np.zeros((GRID_CELL_PX, GRID_CELL_PX, 4), dtype=np.uint8)
    cell[0, :] = cell[-1, :] = cell[:, 0] = cell[:, -1] = (20, 20, 20, 160)
    out = np.zeros((rows * GRID_CELL_PX, cols * GRID_CELL_PX, 4), dtype=np.uint8)
    for r, c in grid.cells:
        out[r * GRID_CELL_PX:(r + 1) * GRID_CELL_PX, c * GRID_CELL_PX:(c + 1) * GRID_CELL_PX] = cell
    return _png(out)


def tissue_png(path) -> bytes:
    """The tiling's tissue mask (a PNG, white = tissue) tinted, glass transparent."""
    with Image.open(path) as im:
        mask = np.asarray(im.convert("L")) > 127
    out = np.zeros(mask.shape + (4,), dtype=np.uint8)
    out[mask] = TISSUE_RGBA
    return _png(out)
