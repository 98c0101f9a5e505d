"""Attention maps smoothed over the tile grid: what heatmaps, tile scores, the viewer and the mask AUC show.

A head's attention is a softmax over a slide's tiles, each tile scored on its own features; tumour, though, is
a region, and a tile at its edge or in a focus smaller than a tile carries less of it than its neighbours say.
Following the smooth operator of Castro-Macias et al. (2024, "Sm: enhanced localization in multiple instance
learning for medical imaging classification"), each tile's log-attention is mixed with the mean log-attention
of its grid neighbours (the up to 8 tiles touching it) and the map renormalised:

    s_i = (1 - w) log a_i + w mean_{j ~ i} log a_j ;   a'_i = exp(s_i) / sum_k exp(s_k)

with ``w = heads.attention_smoothing`` (0: the raw attention), applied ``heads.attention_smoothing_passes``
times (two passes reach the tiles two cells away, a 5 x 5 neighbourhood). A tile without neighbours keeps its
own score. The slide's prediction is untouched: it pools the tiles by the raw attention; only the map is
smoothed. The defaults (w = 0.5, two passes, with CLAM's k = 16) were chosen on two tuning cohorts (demo
seeds 31 and 32, random-init features), not on the demo cohort docs/heads.md reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histcode.wsi.grid import grid_of

LOG_FLOOR = 1e-12  # attention of exactly 0 (a max-instance head's one-hot) is read as this


def neighbour_mean(values: np.ndarray, cells: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Per tile, the mean of ``values`` over the tiles in the 8 grid cells around its ``cells`` (row, col); the
    tile's own value where it has no neighbour."""
    rows, cols = shape
    dense = np.zeros((rows + 2, cols + 2))
    present = np.zeros((rows + 2, cols + 2))
    dense[cells[:, 0] + 1, cells[:, 1] + 1] = values
    present[cells[:, 0] + 1, cells[:, 1] + 1] = 1.0
    total = np.zeros((rows, cols))
    count = np.zeros((rows, cols))
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr == 0 and dc == 0:
                continue
            total += dense[1 + dr:rows + 1 + dr, 1 + dc:cols + 1 + dc]
            count += present[1 + dr:rows + 1 + dr, 1 + dc:cols + 1 + dc]
    t, c = total[cells[:, 0], cells[:, 1]], count[cells[:, 0], cells[:, 1]]
    return np.where(c > 0, t / np.maximum(c, 1.0), values)


def smooth_attention(attention: np.ndarray, xy: np.ndarray, size: int, strength: float,
                     passes: int = 1) -> np.ndarray:
    """The attention map of one slide (``attention`` per tile, tiles at level-0 corners ``xy`` of side
    ``size``) smoothed over the grid with weight ``strength`` in [0, 1], ``passes`` times; sums to 1 like the
    attention."""
    a = np.asarray(attention, dtype=np.float64)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"attention smoothing must lie in [0, 1], got {strength}")
    if passes < 1:
        raise ValueError(f"attention smoothing needs at least one pass, got {passes}")
    if strength == 0.0 or len(a) < 2:
        return a
    grid = grid_of([""] * len(a), np.asarray(xy), size)
    mixed = np.log(np.clip(a, LOG_FLOOR, None))
    for _ in range(passes):
        mixed = (1.0 - strength) * mixed + strength * neighbour_mean(mixed, grid.cells, grid.shape)
    mixed -= mixed.max()
    out = np.exp(mixed)
    return out / out.sum()


@dataclass(frozen=True)
class Smoothing:
    """How attention maps are smoothed (``heads.attention_smoothing`` and ``_passes``); ``Smoothing()`` is off."""

    strength: float = 0.0
    passes: int = 1

    @classmethod
    def of(cls, heads_cfg) -> Smoothing:
        return cls(heads_cfg.attention_smoothing, heads_cfg.attention_smoothing_passes)

    @property
    def off(self) -> bool:
        return self.strength == 0.0

    def key(self) -> list[float]:
        """What a drawing's cache key records of it ([] when off, so raw drawings keep their keys)."""
        return [] if self.off else [self.strength] + ([self.passes] if self.passes != 1 else [])

    def apply(self, attention: np.ndarray, xy: np.ndarray, size: int) -> np.ndarray:
        return smooth_attention(attention, xy, size, self.strength, self.passes)
