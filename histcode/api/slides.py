"""Pictures of a workspace's slides for notebooks: a tile's pixels, a thumbnail, a head's attention over the
tiles, and any per-tile score painted over the slide in the project's colour maps."""

from __future__ import annotations

import numpy as np
import pandas as pd

from histcode.errors import UsageError
from histcode.store.catalog import Catalog
from histcode.workspace import Workspace as Paths


def healthy_slide(paths: Paths, slide_id: str) -> dict:
    """The catalog's row of ``slide_id``; LookupError naming the reason when it is unknown or failed."""
    from histcode.store.catalog import CatalogError

    slide = Catalog.of(paths).get_slide(slide_id)
    if slide is None:
        raise CatalogError(f"no slide {slide_id!r} in the catalog of {paths.root}")
    if slide["status"] != "ok":
        raise CatalogError(f"slide {slide_id!r} is {slide['status']}: {slide.get('reason') or 'no reason recorded'}")
    return slide


def tile_image(paths: Paths, slide_id: str, x: int, y: int, size: int, px: int | None = None):
    """The level-0 square (``x``, ``y``, side ``size``) of the slide as a PIL image, resized to ``px`` on a side
    when given (read from the best pyramid level, as tiling reads it)."""
    from PIL import Image

    from histcode.wsi.dispatch import open_slide
    from histcode.wsi.reader import plan_read

    slide = healthy_slide(paths, slide_id)
    out = int(px or size)
    with open_slide(slide["path"], slide.get("vendor")) as reader:
        plan = plan_read(reader.level_downsamples, int(size), out)
        pixels = reader.read_region((int(x), int(y)), plan.level, (plan.read_px, plan.read_px))
    image = Image.fromarray(pixels)
    return image if image.size == (out, out) else image.resize((out, out), Image.Resampling.BOX)


def thumbnail(paths: Paths, slide_id: str, side: int = 1200) -> tuple[np.ndarray, tuple[float, float]]:
    """The whole slide at about ``side`` pixels on its longer side: an RGB array and its downsample (dx, dy),
    level-0 pixels per thumbnail pixel (a tile at level-0 ``x`` lies at ``x / dx`` in the thumbnail)."""
    from histcode.viz.heatmap import slide_thumbnail

    return slide_thumbnail(healthy_slide(paths, slide_id), side)


def attention(paths: Paths, slide_id: str, alias: str = "attention") -> pd.DataFrame:
    """The registered tumour head's (``histcode-tumor-head@alias``) attention over the slide's tiles, one row
    per tile: ``tile_id``, ``x``, ``y``, ``size``, ``attention`` (smoothed over the tile grid as the heatmaps
    and the viewer draw it) and ``attention_raw`` (the head's weights), and the slide's ``p_tumor``."""
    from histcode.apps.heatmaps import slide_attention, slide_bag
    from histcode.heads.apply import load_head
    from histcode.heads.smoothing import Smoothing
    from histcode.tracking import Tracker

    healthy_slide(paths, slide_id)
    head = load_head(Tracker(paths), "tumor", alias)
    bag = slide_bag(paths, head, slide_id)
    p_tumor, smoothed, raw = slide_attention(head, bag, Smoothing.of(paths.config().heads))
    return pd.DataFrame({"tile_id": list(bag.tile_ids), "x": bag.xy[:, 0], "y": bag.xy[:, 1], "size": bag.size,
                         "attention": smoothed, "attention_raw": raw, "p_tumor": p_tumor})


def scores_picture(paths: Paths, slide_id: str, tiles: pd.DataFrame, score: str, kind: str = "sequential",
                   side: int = 1200) -> np.ndarray:
    """``tiles[score]`` (rows with ``x``, ``y``, ``size``) painted over the slide's thumbnail in the project's
    colour maps (``sequential``: viridis, for attention; ``diverging``: for signed scores such as log2FC), as
    the heatmaps and the viewer paint them: an RGB array."""
    from histcode.viz.heatmap import scores_over_slide

    missing = [c for c in ("x", "y", "size", score) if c not in tiles.columns]
    if missing:
        raise UsageError(f"the tiles frame lacks the columns {missing} (it has {list(tiles.columns)})")
    sizes = tiles["size"].unique()
    if len(sizes) != 1:
        raise UsageError(f"the tiles of one slide share one size; got {sorted(sizes)[:5]}")
    xy = tiles[["x", "y"]].to_numpy(dtype=np.int64)
    picture, _, _ = scores_over_slide(healthy_slide(paths, slide_id), xy, int(sizes[0]), tiles[score].to_numpy(float),
                                      kind, side)
    return picture
