"""Compose one demo slide: real tiles placed cell by cell inside a simulated tissue outline on glass.

Each tile is white-balanced (``histcode.demo.pixels``) and re-stained with the slide's stain (its site's, with a
per-slide jitter) in optical-density space before it is placed; provenance records, per cell, the source
tile, its transform, the share of the cell that is tissue, the mean RGB as placed and the tile's nuclear
measures (from the source pixels, before the site's stain).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from histcode.demo.layout import Layout, make_layout
from histcode.demo.pixels import TileMeasures
from histcode.demo.plan import SlidePlan, SourceTile
from histcode.wsi.stain import restain

GLASS_RGB = (243, 241, 242)
BASE_MPP = 0.5  # the composed canvas is at 20x; 40x slides are upsampled from it


@dataclass
class ComposedSlide:
    image: np.ndarray  # RGB uint8 at BASE_MPP
    layout: Layout
    provenance: list[dict]


@lru_cache(maxsize=2048)
def _load_tile(path: Path, cell_px: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (cell_px, cell_px):
            im = im.resize((cell_px, cell_px), Image.Resampling.LANCZOS)
        return np.asarray(im)


def _dihedral(tile: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of the square: rotate by k % 4 quarter turns, mirror if k >= 4."""
    out = np.rot90(tile, k % 4)
    return out[:, ::-1] if k >= 4 else out


class _Dealer:
    """Draws tiles from a pool in shuffled passes, so every tile is used before any is used again."""

    def __init__(self, pool: list[SourceTile], rng: np.random.Generator) -> None:
        self.pool, self.rng, self.queue = pool, rng, []

    def draw(self) -> SourceTile:
        if not self.queue:
            self.queue = [self.pool[i] for i in self.rng.permutation(len(self.pool))]
        return self.queue.pop()


def _glass(rng: np.random.Generator, height: int, width: int, period: int = 256) -> np.ndarray:
    """Empty glass: a flat colour with faint sensor noise (a repeated noise patch keeps this cheap)."""
    patch = np.asarray(GLASS_RGB, dtype=np.float32) + rng.standard_normal((period, period, 1), dtype=np.float32) * 1.5
    patch = np.clip(patch + 0.5, 0, 255).astype(np.uint8)
    reps = (-(-height // period), -(-width // period), 1)
    return np.tile(patch, reps)[:height, :width]


def compose_slide(
    plan: SlidePlan, pools: dict[str, list[SourceTile]], cells: tuple[int, int], tile_um: float, mask_mpp: float,
    measures: dict[str, TileMeasures] | None = None,
) -> ComposedSlide:
    """``measures`` per source path: the white point to remove from each tile (none without) and what the
    provenance records of it."""
    rng = np.random.default_rng(plan.seed)
    cell_px = round(tile_um / BASE_MPP)
    mask_cell_px = round(tile_um / mask_mpp)
    layout = make_layout(rng, cells, mask_cell_px, plan.tumour_fraction, plan.coverage, plan.small_focus)
    share = layout.tissue_share()
    rows, cols = cells
    height, width = rows * cell_px, cols * cell_px
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = GLASS_RGB
    dealers = {kind: _Dealer(pool, rng) for kind, pool in pools.items() if pool}
    provenance = []
    for r in range(rows):
        for c in range(cols):
            if not layout.tissue_cells[r, c]:
                continue
            kind = "tumour" if layout.tumour_cells[r, c] else "normal"
            src = dealers[kind].draw()
            k = int(rng.integers(0, 8))
            m = (measures or {}).get(str(src.path))
            tile = restain(_load_tile(src.path, cell_px), plan.stain, np.asarray(m.white_od) if m else None)
            canvas[r * cell_px:(r + 1) * cell_px, c * cell_px:(c + 1) * cell_px] = _dihedral(tile, k)
            mean = tile.reshape(-1, 3).mean(axis=0)
            provenance.append({"slide_id": plan.slide_id, "row": r, "col": c, "kind": kind, "source": src.path.name,
                               "label": src.label, "group_id": src.group_id, "dihedral": k,
                               "tissue_share": round(float(share[r, c]), 4),
                               "mean_r": round(float(mean[0]), 2), "mean_g": round(float(mean[1]), 2),
                               "mean_b": round(float(mean[2]), 2),
                               "nuclear_density": round(m.nuclear_density, 1) if m else float("nan"),
                               "nuclear_area": round(m.nuclear_area, 2) if m else float("nan")})
    # Tissue outline at full resolution: the soft mask upsampled, sharpened to a few-pixel feather.
    soft = Image.fromarray(layout.tissue.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    alpha = np.clip((np.asarray(soft) - 0.5) * 4 + 0.5, 0, 1)
    glass = _glass(rng, height, width)
    bare = alpha <= 0
    canvas[bare] = glass[bare]
    edge = (alpha > 0) & (alpha < 1)
    a = alpha[edge][:, None]
    canvas[edge] = (a * canvas[edge] + (1 - a) * glass[edge] + 0.5).astype(np.uint8)
    image = canvas
    return ComposedSlide(image=image, layout=layout, provenance=provenance)


def upsample(image: np.ndarray, factor: int) -> np.ndarray:
    """The same physical content at ``factor`` times the pixel density (for 40x slides)."""
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w * factor, h * factor), Image.Resampling.BILINEAR))
