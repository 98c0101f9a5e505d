"""What the demo measures on its real source tiles: each LC25000 class's white point, and nuclear measures.

LC25000 photographed each class as its own batch: the brightest pixels of benign tiles are pink (about RGB
235, 210, 224), those of tumour tiles lavender (208, 209, 255), so the colour of empty space alone tells the
class. A batch's white point is the median over its train tiles of each tile's 1st-percentile OD per channel
(its brightest pixels). A tile is white-balanced by removing, per channel, the smaller of its batch's white
point and its own: the batch's cast comes off, the same for every tile of the batch, but no tile is pushed
past neutral (a tile whiter than its batch's median would turn green). What differs between tiles of a batch,
the tissue, stays as it was.

Nuclear measures come from the haematoxylin channel (Ruifrok-Johnston unmixing of the white-balanced OD,
smoothed at sigma 1 px): nuclei are connected regions above ``NUCLEUS_H`` after one opening, and count when
they cover at least ``MIN_NUCLEUS_PX`` pixels. Per tile: ``nuclear_density`` (nuclei per mm2 at the demo's
scale, 0.5 um/px) and ``nuclear_area`` (mean area of a nucleus, um2). Colour statistics of a tile predict the
count poorly (cross-validated R2 about 0.2 from mean and sd of RGB), the area somewhat (about 0.4): they are
morphology, and the expression model reads them from the tumour tiles a slide actually holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from histcode.wsi.stain import UNMIX, rgb_to_od, white_balance

NUCLEUS_H = 0.6  # haematoxylin concentration (reference units) above which a pixel is nuclear
MIN_NUCLEUS_PX = 20  # 5 um2 at 0.5 um/px
WHITE_PERCENTILE = 1.0  # a tile's brightest 1% of pixels per channel
PIXEL_UM = 0.5  # LC25000 tiles as placed: 224 px over 112 um


@dataclass(frozen=True)
class TileMeasures:
    mean_rgb: tuple[float, float, float]  # the tile as photographed
    white_od: tuple[float, float, float]  # the white point removed from it (zeros without white balance)
    nuclear_density: float = float("nan")  # nuclei per mm2 (after the batch white balance)
    nuclear_area: float = float("nan")  # um2 per nucleus


@dataclass(frozen=True)
class SourceMeasures:
    tiles: dict[str, TileMeasures]  # by source path (str)
    white_od: dict[str, tuple[float, float, float]]  # per class (label)
    class_stats: dict[str, dict[str, tuple[float, float]]]  # label -> measure -> (mean, sd) over its tiles

    def z(self, label: str, measure: str, value: float) -> float:
        """``value`` of ``measure`` in standard deviations of the class's tiles from their mean."""
        mean, sd = self.class_stats[label][measure]
        return float((value - mean) / sd) if sd > 0 else 0.0


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def nuclear_measures(rgb: np.ndarray, white_od: np.ndarray | None) -> tuple[float, float]:
    """(nuclei per mm2, mean nucleus area um2) of one tile at 0.5 um/px."""
    h = (white_balance(rgb_to_od(rgb), white_od) @ UNMIX[:, 0].astype(np.float32))
    nuclei = ndimage.binary_opening(ndimage.gaussian_filter(h, 1.0) > NUCLEUS_H)
    labels, n = ndimage.label(nuclei)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    sizes = sizes[sizes >= MIN_NUCLEUS_PX]
    area_mm2 = rgb.shape[0] * rgb.shape[1] * (PIXEL_UM / 1000) ** 2
    return float(len(sizes) / area_mm2), float(sizes.mean() * PIXEL_UM**2) if len(sizes) else 0.0


def measure_sources(tiles: list, white_balanced: bool) -> SourceMeasures:
    """Measures of every source tile (``SourceTile``s), cached per process (a build reads them once)."""
    return _measure(tuple(tiles), white_balanced)


@lru_cache(maxsize=4)
def _measure(tiles: tuple, white_balanced: bool) -> SourceMeasures:
    pixels = {str(t.path): read_rgb(t.path) for t in tiles}  # about 150 MB for the bundled tiles, for seconds
    own = {p: np.percentile(rgb_to_od(rgb).reshape(-1, 3), WHITE_PERCENTILE, axis=0) for p, rgb in pixels.items()}
    labels = sorted({t.label for t in tiles})
    white = {lab: tuple(float(v) for v in np.median([own[str(t.path)] for t in tiles if t.label == lab], axis=0))
             for lab in labels}
    measures = {}
    for t in tiles:
        rgb = pixels.pop(str(t.path))
        applied = np.minimum(own[str(t.path)], white[t.label]) if white_balanced else np.zeros(3)
        density, area = nuclear_measures(rgb, applied)
        measures[str(t.path)] = TileMeasures(tuple(float(v) for v in rgb.reshape(-1, 3).mean(axis=0)),
                                             tuple(float(v) for v in applied), density, area)
    stats = {}
    for lab in labels:
        values = [measures[str(t.path)] for t in tiles if t.label == lab]
        stats[lab] = {m: (float(np.mean([getattr(v, m) for v in values])), float(np.std([getattr(v, m) for v in values])))
                      for m in ("nuclear_density", "nuclear_area")}
    return SourceMeasures(measures, white, stats)


def group_measures(tiles: list, measures: SourceMeasures) -> dict[str, tuple[float, float]]:
    """Per LC25000 group: mean (nuclear_density, nuclear_area) z-scores of its tiles within their class."""
    acc: dict[str, list[tuple[float, float]]] = {}
    for t in tiles:
        m = measures.tiles[str(t.path)]
        acc.setdefault(t.group_id, []).append((measures.z(t.label, "nuclear_density", m.nuclear_density),
                                               measures.z(t.label, "nuclear_area", m.nuclear_area)))
    return {g: tuple(float(x) for x in np.mean(v, axis=0)) for g, v in acc.items()}
