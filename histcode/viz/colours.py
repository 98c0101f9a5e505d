"""Colours for tile scores over a slide: one RGBA per tile and the matching colour bar.

Shared by the static heatmaps (:mod:`histcode.viz.heatmap`) and any web viewer that paints tiles itself: the
functions here are pure (numpy and matplotlib's colour-map registry only; no pyplot, no figure) and matplotlib
is imported on first use, so importing this module costs nothing.

How a score becomes a colour:

- ``sequential`` scores (attention: non-negative, summing to 1 over the slide) are scaled from 0 (or from
  their 1st percentile where some are negative) to their 99th percentile, so the few tiles a head looks at
  set the scale rather than the single strongest one; higher values saturate. Map: ``viridis``. It is
  perceptually uniform and its hues (blue, green, yellow) do not occur in H&E, so a painted tile never reads
  as stain; ``magma``/``inferno`` run through the purples and pinks of haematoxylin and eosin and end
  near white, the colour of bare glass.
- ``diverging`` scores (a gene's log2FC) are centred on 0 with symmetric limits +-L, L the 99th percentile
  of ``|score|``. Map: the first of matplotlib's perceptually uniform diverging maps ``managua`` (orange for
  down, cyan-blue for up), ``berlin``, ``vanimo`` that this matplotlib has, else ``RdBu_r``. ``managua``
  first because both its ends stand out from H&E; ``berlin``'s salmon (up) and ``vanimo``'s pink (down)
  ends vanish into eosin. All three are dark in the middle, so mid-strength tiles darken the tissue a
  little; ``RdBu_r`` (pale middle, not perceptually uniform) avoids that, at the price of uniformity.
- The opacity grows with the score's strength ``t`` in [0, 1] (``score / upper limit``, or ``|score| / L``):
  0 up to ``ALPHA_FLOOR``, then linearly up to ``ALPHA_MAX`` at the limit, so weak tiles leave the tissue
  untouched and even the strongest let it show through.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import numpy as np

Kind = Literal["sequential", "diverging"]

SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAPS = ("managua", "berlin", "vanimo")  # perceptually uniform (matplotlib >= 3.10); else RdBu_r
ALPHA_MAX = 0.75  # opacity at (and beyond) the colour scale's limit
ALPHA_FLOOR = 0.1  # strength below which a tile is fully transparent
QUANTILE = 0.99  # the colour scale's limit: this quantile of the scores (of |scores| when diverging)


@cache
def cmap_name(kind: Kind) -> str:
    if kind == "sequential":
        return SEQUENTIAL_CMAP
    if kind == "diverging":
        from matplotlib import colormaps

        return next((name for name in DIVERGING_CMAPS if name in colormaps), "RdBu_r")
    raise ValueError(f"kind must be 'sequential' or 'diverging', not {kind!r}")


def _cmap(kind: Kind):
    from matplotlib import colormaps

    return colormaps[cmap_name(kind)]


def score_limits(scores: np.ndarray, kind: Kind, quantile: float = QUANTILE) -> tuple[float, float]:
    """The colour scale's (low, high): sequential (0, q-th quantile), or from the (1 - q)-th quantile where some
    scores are negative; diverging (-L, L), L the q-th quantile of ``|scores|``. A degenerate quantile (the
    scores concentrated on fewer tiles than 1 - q of them) falls back to the extreme score, and all-zero
    scores to 1, so the limits are always ordered and distinct. NaN scores are ignored."""
    s = np.asarray(scores, dtype=float).ravel()
    s = s[np.isfinite(s)]
    if kind == "diverging":
        a = np.abs(s)
        top = float(np.quantile(a, quantile)) if a.size else 0.0
        top = top if top > 0 else (float(a.max()) if a.size and a.max() > 0 else 1.0)
        return -top, top
    cmap_name(kind)  # validates kind
    lo = 0.0 if not s.size or s.min() >= 0 else float(np.quantile(s, 1 - quantile))
    hi = float(np.quantile(s, quantile)) if s.size else lo + 1.0
    if hi <= lo:
        hi = float(s.max()) if s.size and s.max() > lo else lo + 1.0
    return lo, hi


def positions(scores: np.ndarray, kind: Kind, limits: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(place on the colour map in [0, 1], strength in [0, 1]) of each score under ``limits``; NaN stays NaN."""
    s = np.asarray(scores, dtype=float).ravel()
    lo, hi = limits
    if kind == "diverging":
        t = np.clip(s / max(abs(lo), abs(hi)), -1.0, 1.0)
        return 0.5 + 0.5 * t, np.abs(t)
    cmap_name(kind)
    t = np.clip((s - lo) / (hi - lo), 0.0, 1.0)
    return t, t


def alpha_of(strength: np.ndarray) -> np.ndarray:
    """Opacity in [0, ALPHA_MAX] from strength in [0, 1]: 0 up to ALPHA_FLOOR, then linear; NaN -> 0."""
    a = ALPHA_MAX * np.clip((np.asarray(strength, dtype=float) - ALPHA_FLOOR) / (1.0 - ALPHA_FLOOR), 0.0, 1.0)
    return np.nan_to_num(a, nan=0.0)


def tile_rgba(scores: np.ndarray, kind: Kind, limits: tuple[float, float] | None = None) -> np.ndarray:
    """One RGBA (uint8, shape (n, 4)) per score: RGB the colour map at the score's place, A its opacity times
    255 (see the module docstring). ``limits`` default to :func:`score_limits` of ``scores``; pass them to
    colour several slides (or a slide in pieces) on one scale. NaN scores are fully transparent."""
    s = np.asarray(scores, dtype=float).ravel()
    limits = score_limits(s, kind) if limits is None else limits
    place, strength = positions(s, kind, limits)
    rgba = np.zeros((s.size, 4), dtype=np.uint8)
    ok = np.isfinite(place)
    rgba[ok, :3] = _cmap(kind)(place[ok], bytes=True)[:, :3]
    rgba[:, 3] = np.round(alpha_of(strength) * 255).astype(np.uint8)
    return rgba


def colour_stops(kind: Kind, limits: tuple[float, float], n: int = 11) -> list[dict]:
    """The colour bar as ``n`` evenly spaced stops from the low limit to the high one, each
    ``{"offset": 0..1, "value": score, "color": "rgba(r, g, b, a)" (CSS), "rgba": [r, g, b, a] (0..255)}``,
    coloured by :func:`tile_rgba` (opacity included: the bar shows what a tile of that score looks like over
    white)."""
    lo, hi = limits
    values = np.linspace(lo, hi, max(2, n))
    rgba = tile_rgba(values, kind, limits)
    return [{"offset": round(float(i / (len(values) - 1)), 6), "value": float(v),
             "color": f"rgba({r}, {g}, {b}, {a / 255:.3f})", "rgba": [r, g, b, a]}
            for i, (v, (r, g, b, a)) in enumerate(zip(values, rgba.tolist()))]


def css_gradient(stops: list[dict], direction: str = "to top") -> str:
    """A CSS ``linear-gradient`` of :func:`colour_stops` (low limit at the start of ``direction``)."""
    return f"linear-gradient({direction}, " + ", ".join(f"{s['color']} {100 * s['offset']:.2f}%" for s in stops) + ")"
