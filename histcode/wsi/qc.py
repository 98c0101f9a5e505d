"""Per-tile pixel QC: how much of a tile is white glass and how sharp it is (variance of the Laplacian)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histcode.config import TileQCConfig


@dataclass(frozen=True)
class TileQC:
    white_fraction: float
    laplacian_var: float

    def reason(self, cfg: TileQCConfig) -> str | None:
        """Why the tile is rejected, or None when it passes."""
        if self.white_fraction > cfg.max_white_fraction:
            return f"white {self.white_fraction:.2f} > {cfg.max_white_fraction}"
        if self.laplacian_var < cfg.min_laplacian_var:
            return f"blurred: Laplacian variance {self.laplacian_var:.1f} < {cfg.min_laplacian_var}"
        return None


def white_fraction(rgb: np.ndarray, threshold: int) -> float:
    """Fraction of pixels whose three channels are all at or above ``threshold``."""
    return float((rgb >= threshold).all(axis=-1).mean())


def laplacian_variance(rgb: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image (interior pixels); low means blurred or flat."""
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if min(grey.shape) < 3:
        return 0.0
    lap = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    return float(lap.var())


def measure(rgb: np.ndarray, cfg: TileQCConfig) -> TileQC:
    return TileQC(white_fraction(rgb, cfg.white_threshold), laplacian_variance(rgb))
