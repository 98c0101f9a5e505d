"""Heatmaps: tile scores (attention, or a gene's predicted log2FC) painted over the slide thumbnail, with a
colour bar, as PNG.

Each tile is painted in its own colour and opacity (:func:`histcode.viz.colours.tile_rgba`: weak scores leave
the tissue untouched, strong ones tint it at most 75 % opaque), at exactly the tile grid's resolution: every
thumbnail pixel takes the colour of the tile that contains its centre, and the thumbnail is drawn at one
pixel per pixel (no resampling). Matplotlib is imported when a heatmap is drawn, not when this module is
imported, and no pyplot (no global figure state, no backend switch)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from histcode.viz.colours import Kind, colour_stops, score_limits, tile_rgba
from histcode.wsi.grid import grid_of
from histcode.wsi.dispatch import open_slide
from histcode.wsi.reader import render_at_mpp

SIDE = 1200  # the thumbnail's long side, pixels
DPI = 100
PAD = 16  # pixels around the thumbnail
BAR_GAP, BAR_WIDTH, BAR_TEXT = 22, 18, 120  # colour bar: gap to the thumbnail, width, room for ticks and label
TITLE_PT, LINE_PX = 10, 18  # title font size, line height in pixels


def tile_overlay(shape: tuple[int, int], downsample: tuple[float, float], xy: np.ndarray, size: int,
                 rgba: np.ndarray) -> np.ndarray:
    """The RGBA image (``shape`` = (height, width)) of tiles with level-0 corners ``xy`` and side ``size`` on a
    thumbnail of that ``downsample``: each pixel gets the colour of the tile containing its centre (nearest
    neighbour on the regular tile grid), pixels outside every tile are transparent."""
    h, w = shape
    out = np.zeros((h, w, 4), dtype=np.uint8)
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    if not len(xy):
        return out
    grid = grid_of([], xy, size)
    index = np.full(grid.shape, -1)
    index[grid.cells[:, 0], grid.cells[:, 1]] = np.arange(len(xy))
    ox, oy = grid.origin
    cols = np.floor(((np.arange(w) + 0.5) * downsample[0] - ox) / size).astype(int)
    rows = np.floor(((np.arange(h) + 0.5) * downsample[1] - oy) / size).astype(int)
    col_ok = (cols >= 0) & (cols < index.shape[1])
    row_ok = (rows >= 0) & (rows < index.shape[0])
    which = np.full((h, w), -1)
    which[np.ix_(row_ok, col_ok)] = index[np.ix_(rows[row_ok], cols[col_ok])]
    painted = which >= 0
    out[painted] = rgba[which[painted]]
    return out


def blend(thumb: np.ndarray, overlay: np.ndarray) -> np.ndarray:
    """``overlay`` (RGBA) composited over ``thumb`` (RGB): straight alpha, rounded to uint8."""
    a = overlay[..., 3:4].astype(np.float32) / 255.0
    out = thumb.astype(np.float32) * (1.0 - a) + overlay[..., :3].astype(np.float32) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _wrap(text: str, width_px: float, bold: bool) -> list[str]:
    """``text`` in lines no wider than ``width_px`` in the title's font (measured, as drawn; any id: long,
    without spaces, with newlines)."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    font = FontProperties(size=TITLE_PT, weight="bold" if bold else "normal")
    renderer = RendererAgg(8, 8, DPI)

    def wide(line: str) -> float:
        return renderer.get_text_width_height_descent(line, font, ismath=False)[0]

    text = " ".join(text.split())
    chars = max(8, int(width_px / max(wide(text) / max(len(text), 1), 1.0)))
    while True:
        lines = textwrap.wrap(text, chars) or [""]
        if chars <= 8 or all(wide(line) <= width_px for line in lines):
            return lines
        chars = int(chars * 0.95)


def _fmt(v: float) -> str:
    return "0" if v == 0 else f"{v:.3g}"


def slide_thumbnail(slide: dict, side: int = SIDE) -> tuple[np.ndarray, tuple[float, float]]:
    """The slide (keys path, mpp_x, width, height) read whole at about ``side`` pixels on its longer side: an
    RGB array and its downsample (dx, dy), level-0 pixels per thumbnail pixel."""
    mpp = float(slide["mpp_x"])
    with open_slide(slide["path"], slide.get("vendor")) as reader:
        return render_at_mpp(reader, mpp, mpp * max(slide["width"], slide["height"]) / side)


def scores_over_slide(slide: dict, xy: np.ndarray, size: int, scores: np.ndarray, kind: Kind = "sequential",
                      side: int = SIDE) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """``scores`` (one per tile) painted over the slide's thumbnail in the project's colour maps (the picture
    without title or colour bar), the colour scale's limits and the thumbnail's downsample (dx, dy)."""
    thumb, downsample = slide_thumbnail(slide, side)
    scores = np.asarray(scores, dtype=float).ravel()
    limits = score_limits(scores, kind)
    picture = blend(thumb, tile_overlay(thumb.shape[:2], downsample, xy, size, tile_rgba(scores, kind, limits)))
    return picture, limits, downsample


def heatmap_png(slide: dict, xy: np.ndarray, size: int, scores: np.ndarray, title: str, label: str, path: Path,
                kind: Kind = "sequential", head: str = "") -> Path:
    """Draw ``scores`` (one per tile; ``xy`` level-0 corners and ``size`` level-0 side of the tiles) over the
    thumbnail of ``slide`` (keys path, mpp_x, width, height; slide_id for the title, else the file name).

    ``kind``: ``"sequential"`` (attention) or ``"diverging"`` (signed, e.g. log2FC; centred on 0), see
    :mod:`histcode.viz.colours`. Title: the slide id, then ``head`` (e.g. ``"tumor-head v3"``) and ``title``.
    The colour bar, labelled ``label``, shows the scale's limits (a value beyond them is drawn as the limit:
    ``>=``/``<=``) and fades where tiles fade. The PNG's text chunks ``thumbnail_box`` ("left top width
    height", pixels) and ``downsample`` ("dx dy", level-0 pixels per thumbnail pixel) say where the thumbnail
    lies in the picture, for whoever reads positions off it."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure

    scores = np.asarray(scores, dtype=float).ravel()
    picture, limits, (dx, dy) = scores_over_slide(slide, xy, size, scores, kind)

    h, w = picture.shape[:2]
    fig_w = max(PAD + w + BAR_GAP + BAR_WIDTH + BAR_TEXT, 480)
    slide_id = str(slide.get("slide_id") or Path(slide["path"]).name)
    subtitle = " · ".join(part for part in (head, title) if part)
    lines = [_wrap(text, fig_w - 2 * PAD, bold=i == 0) for i, text in enumerate((slide_id, subtitle)) if text]
    top = PAD + LINE_PX * sum(len(x) for x in lines) + 8
    fig_h = top + h + PAD
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI, facecolor="white")
    fig.figimage(picture, xo=PAD, yo=fig_h - top - h, origin="upper")  # one pixel per pixel, no resampling
    y = fig_h - PAD
    for i, block in enumerate(lines):
        for line in block:
            fig.text(PAD / fig_w, y / fig_h, line, ha="left", va="top", fontsize=TITLE_PT, parse_math=False,
                     fontweight="bold" if i == 0 else "normal")  # ids and genes are text, never mathtext
            y -= LINE_PX

    lo, hi = limits
    bar = np.array([s["rgba"] for s in colour_stops(kind, limits, n=256)], dtype=float) / 255.0
    cax = fig.add_axes(((PAD + w + BAR_GAP) / fig_w, (fig_h - top - h) / fig_h, BAR_WIDTH / fig_w, h / fig_h))
    cbar = fig.colorbar(ScalarMappable(norm=Normalize(lo, hi), cmap=ListedColormap(bar)), cax=cax)
    ticks = [lo, 0.0, hi] if kind == "diverging" else [lo, hi]
    names = [_fmt(v) for v in ticks]
    finite = scores[np.isfinite(scores)]
    if finite.size and finite.max() > hi:
        names[-1] = f"≥{names[-1]}"
    if finite.size and finite.min() < lo:
        names[0] = f"≤{names[0]}"
    cbar.set_ticks(ticks, labels=names)
    cbar.set_label(label, parse_math=False)
    cbar.outline.set_linewidth(0.5)

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white", metadata={
        "thumbnail_box": f"{PAD} {top} {w} {h}", "downsample": f"{dx!r} {dy!r}"})
    return path
