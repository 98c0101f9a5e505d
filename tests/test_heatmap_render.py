"""Heatmaps drawn over a real slide, checked in the PNG's pixels; the tile colouring checked from its definition."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
from matplotlib import colormaps
from PIL import Image

from histcode.viz import colours
from histcode.viz.colours import (
    ALPHA_FLOOR,
    ALPHA_MAX,
    colour_stops,
    css_gradient,
    score_limits,
    tile_rgba,
)
from histcode.viz.heatmap import SIDE, heatmap_png
from histcode.wsi.reader import OpenSlideReader, render_at_mpp

SLIDE = Path(__file__).parent / "fixtures" / "slides" / "CMU-1-Small-Region.svs"
SIZE = 256


@pytest.fixture(scope="module")
def slide() -> dict:
    with openslide.OpenSlide(str(SLIDE)) as osr:
        width, height = osr.dimensions
        return {"path": str(SLIDE), "mpp_x": float(osr.properties["openslide.mpp-x"]), "width": width,
                "height": height, "slide_id": "CMU-1-Small-Region"}


@pytest.fixture(scope="module")
def plain(slide) -> tuple[np.ndarray, tuple[float, float]]:
    """The plain thumbnail, rendered exactly as the heatmap renders it."""
    mpp = slide["mpp_x"]
    with OpenSlideReader(slide["path"]) as reader:
        return render_at_mpp(reader, mpp, mpp * max(slide["width"], slide["height"]) / SIDE)


@pytest.fixture(scope="module")
def grid(slide) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(0, slide["width"] - SIZE + 1, SIZE), np.arange(0, slide["height"] - SIZE + 1, SIZE))
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def read_png(path: Path) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    with Image.open(path) as im:
        box = tuple(int(v) for v in im.text["thumbnail_box"].split())
        return np.asarray(im.convert("RGB")).astype(int), box


def tile_pixels(xy, downsample) -> tuple[slice, slice]:
    """The thumbnail pixels well inside a tile (2-pixel margin), as (rows, cols)."""
    dx, dy = downsample
    c0, c1 = int(np.ceil(xy[0] / dx)) + 2, int((xy[0] + SIZE) / dx) - 2
    r0, r1 = int(np.ceil(xy[1] / dy)) + 2, int((xy[1] + SIZE) / dy) - 2
    return slice(r0, r1), slice(c0, c1)


def darkest_tiles(thumb, downsample, grid, k) -> list[int]:
    """Indices of the ``k`` tiles with the most tissue (darkest on average) in the thumbnail."""
    means = [thumb[tile_pixels(xy, downsample)].mean() for xy in grid]
    return [int(i) for i in np.argsort(means)[:k]]


def centre(xy, downsample) -> tuple[int, int]:
    return int((xy[1] + SIZE / 2) / downsample[1]), int((xy[0] + SIZE / 2) / downsample[0])


def unblend(pixel, under, alpha) -> np.ndarray:
    return (np.asarray(pixel, dtype=float) - (1 - alpha) * np.asarray(under, dtype=float)) / alpha


def place_on_map(rgb, cmap_name: str) -> float:
    """Where on the colour map (0..1) the colour nearest ``rgb`` lies."""
    lut = colormaps[cmap_name](np.linspace(0.0, 1.0, 256))[:, :3] * 255
    return float(np.argmin(((lut - rgb) ** 2).sum(axis=1)) / 255)


def test_attention_heatmap_leaves_tissue_visible_and_paints_the_top_tile(slide, plain, grid, tmp_path) -> None:
    thumb, ds = plain
    top, second, third, zero = darkest_tiles(thumb, ds, grid, 4)
    scores = np.zeros(len(grid))
    scores[[top, second, third]] = [0.6, 0.3, 0.1]  # attention: non-negative, sums to 1, on three tiles
    path = heatmap_png(slide, grid, SIZE, scores, "attention", "attention", tmp_path / "a.png", head="tumor-head v7")
    png, (left, upper, w, h) = read_png(path)
    assert (w, h) == (thumb.shape[1], thumb.shape[0])
    shown = png[upper:upper + h, left:left + w]

    # (1) every pixel outside the scored tiles is the thumbnail's own (drawn 1:1, nothing painted)
    painted = np.zeros(thumb.shape[:2], bool)
    for i in (top, second, third):
        r, c = tile_pixels(grid[i], ds)
        painted[r.start - 4:r.stop + 4, c.start - 4:c.stop + 4] = True
    assert np.abs(shown[~painted] - thumb[~painted]).max() <= 2
    r, c = centre(grid[zero], ds)
    assert np.abs(shown[r, c] - thumb[r, c]).max() <= 2 and thumb[r, c].mean() < 230  # tissue, and unpainted

    # (2) the top tile is clearly coloured: viridis' top colour at the most opacity
    top_colour = np.asarray(colormaps["viridis"](1.0)[:3]) * 255
    r, c = centre(grid[top], ds)
    assert np.abs(shown[r, c] - thumb[r, c]).sum() > 100
    assert np.abs(shown[r, c] - ((1 - ALPHA_MAX) * thumb[r, c] + ALPHA_MAX * top_colour)).max() <= 3
    inside = tile_pixels(grid[top], ds)  # the whole tile in that one colour over its tissue: exact tile resolution
    assert np.abs(shown[inside] - ((1 - ALPHA_MAX) * thumb[inside] + ALPHA_MAX * top_colour)).max() <= 3


def test_log2fc_heatmap_puts_up_and_down_on_opposite_sides_of_the_map(slide, plain, grid, tmp_path) -> None:
    thumb, ds = plain
    up, down = darkest_tiles(thumb, ds, grid, 2)
    scores = np.zeros(len(grid))
    scores[up], scores[down] = 2.0, -1.5
    path = heatmap_png(slide, grid, SIZE, scores, "predicted log2FC of KRT5 per tile", "KRT5 log2FC",
                       tmp_path / "fc.png", kind="diverging", head="de-head v2")
    png, (left, upper, w, h) = read_png(path)
    shown = png[upper:upper + h, left:left + w]
    name = colours.cmap_name("diverging")
    places = {}
    for i in (up, down):
        r, c = centre(grid[i], ds)
        alpha = tile_rgba(scores, "diverging")[i, 3] / 255
        assert alpha > 0.5 and np.abs(shown[r, c] - thumb[r, c]).sum() > 60
        places[i] = place_on_map(unblend(shown[r, c], thumb[r, c], alpha), name)
    assert places[up] > 0.8 and places[down] < 0.2
    r, c = centre(grid[np.flatnonzero(scores == 0)[0]], ds)
    assert np.abs(shown[r, c] - thumb[r, c]).max() <= 2


def test_sequential_tile_rgba_from_its_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.exponential(size=500)
    scores /= scores.sum()
    lo, hi = score_limits(scores, "sequential")
    assert lo == 0 and hi == pytest.approx(np.quantile(scores, 0.99))
    rgba = tile_rgba(scores, "sequential")
    assert rgba.shape == (500, 4) and rgba.dtype == np.uint8
    t = np.clip(scores / hi, 0, 1)
    assert (rgba[t < ALPHA_FLOOR, 3] == 0).all() and (rgba[t > ALPHA_FLOOR + 0.01, 3] > 0).all()
    order = np.argsort(scores)
    assert (np.diff(rgba[order, 3].astype(int)) >= 0).all()  # alpha never falls as the score grows
    assert rgba[scores >= hi, 3].min() == round(ALPHA_MAX * 255) == rgba[:, 3].max()
    assert np.abs(rgba[:, :3].astype(int) - np.asarray(colormaps["viridis"](t))[:, :3] * 255).max() <= 1
    expected = ALPHA_MAX * np.clip((t - ALPHA_FLOOR) / (1 - ALPHA_FLOOR), 0, 1) * 255
    assert np.abs(rgba[:, 3] - expected).max() <= 0.5 + 1e-9


def test_diverging_tile_rgba_is_centred_and_symmetric() -> None:
    scores = np.array([-4.0, -2.0, -0.1, 0.0, 0.1, 2.0, 4.0, np.nan])
    limits = (-2.0, 2.0)
    rgba = tile_rgba(scores, "diverging", limits)
    cmap = colormaps[colours.cmap_name("diverging")]
    assert colours.cmap_name("diverging") == next(n for n in (*colours.DIVERGING_CMAPS, "RdBu_r") if n in colormaps)
    place = 0.5 + 0.5 * np.clip(scores[:-1] / 2.0, -1, 1)
    assert np.abs(rgba[:-1, :3].astype(int) - np.asarray(cmap(place))[:, :3] * 255).max() <= 1
    a = rgba[:, 3].astype(int)
    assert a[3] == a[2] == a[4] == 0 and a[-1] == 0  # 0, below the floor, NaN: transparent
    assert a[1] == a[5] == a[0] == a[6] == round(ALPHA_MAX * 255)  # symmetric, saturating beyond the limits
    assert (rgba[0, :3] == rgba[1, :3]).all() and not (rgba[1, :3] == rgba[5, :3]).all()
    lo, hi = score_limits(np.array([-3.0, 0.5, 1.0]), "diverging")
    assert lo == -hi and hi > 0
    assert score_limits(np.zeros(5), "diverging") == (-1.0, 1.0) and score_limits(np.zeros(5), "sequential") == (0, 1)
    one = np.zeros(200)
    one[7] = 1.0  # concentrated on fewer tiles than 1 % of them: the limit falls back to the strongest
    assert score_limits(one, "sequential") == (0.0, 1.0) and tile_rgba(one, "sequential")[7, 3] == round(ALPHA_MAX * 255)
    with pytest.raises(ValueError):
        tile_rgba(scores, "qualitative")


def test_colour_stops_match_tile_rgba() -> None:
    stops = colour_stops("diverging", (-2.0, 2.0), n=5)
    assert [s["offset"] for s in stops] == [0, 0.25, 0.5, 0.75, 1] and [s["value"] for s in stops] == [-2, -1, 0, 1, 2]
    rgba = tile_rgba(np.array([s["value"] for s in stops]), "diverging", (-2.0, 2.0))
    assert [s["rgba"] for s in stops] == rgba.tolist()
    r, g, b, a = rgba[0]
    assert stops[0]["color"] == f"rgba({r}, {g}, {b}, {a / 255:.3f})" and stops[2]["color"].endswith(", 0.000)")
    assert css_gradient(stops).startswith("linear-gradient(to top, rgba(") and "100.00%)" in css_gradient(stops)


def test_importing_the_heatmap_module_does_not_import_matplotlib() -> None:
    code = "import sys, histcode.viz.heatmap, histcode.viz.colours; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
