"""`histcode heatmap SLIDE`: the tumour head's attention and the DE head's gene-specific tile scores over the
slide, as PNGs, stored per tile in the catalog (table ``tile_scores``), and measured against the ground-truth
mask where the slide has one. The attention drawn, stored (``attention``) and measured is the map smoothed over
the tile grid (``heads.attention_smoothing``, ``histcode.heads.smoothing``); the head's own weights are stored
beside it as ``attention_raw``."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from histcode.features.registry import load_view
from histcode.heads.apply import LoadedHead, load_head, optional_head
from histcode.heads.data import Bag, load_bags
from histcode.heads.masks import slide_mask_auc
from histcode.heads.smoothing import Smoothing
from histcode.store.catalog import Catalog
from histcode.store.records import utcnow
from histcode.tracking import Tracker
from histcode.viz.heatmap import heatmap_png
from histcode.workspace import Workspace, file_stem

log = logging.getLogger(__name__)

EXPERIMENT = "heatmaps"


@dataclass
class HeatmapResult:
    slide_id: str
    pictures: list[Path] = field(default_factory=list)
    mask_auc: float | None = None
    scores: pd.DataFrame | None = None  # one row per tile and score
    views: dict[str, str] = field(default_factory=dict)  # "task-head v<version>" -> the feature view it read


def slide_bag(ws: Workspace, head: LoadedHead, slide_id: str) -> Bag:
    view = load_view(Catalog.of(ws), head.view_id)
    bag = load_bags(ws, view, slide_ids=[slide_id]).get(slide_id)
    if bag is None:
        raise LookupError(f"{slide_id} has no vectors in view {head.view_id}: run `histcode embed --slide {slide_id}`")
    return bag


def slide_attention(head: LoadedHead, bag: Bag, smoothing: Smoothing) -> tuple[float, np.ndarray, np.ndarray]:
    """A tumour head on one slide's bag: (p_tumor, NaN for a head without a tumour class; the attention
    smoothed over the tile grid as heatmaps and the viewer draw it; the head's raw attention weights)."""
    out, raw = head(bag.features)
    p_tumor = float(out[list(head.classes).index("tumor")]) if "tumor" in head.classes else float("nan")
    return p_tumor, smoothing.apply(raw, bag.xy, bag.size), raw


def store_scores(catalog: Catalog, head: LoadedHead, scores: pd.DataFrame) -> None:
    model = f"{head.task}-head"
    with catalog.transaction() as con:
        for sid in scores.slide_id.unique():
            con.execute("DELETE FROM tile_scores WHERE model = ? AND version = ? AND slide_id = ?", [model, head.version, sid])
        frame = scores.assign(model=model, version=head.version, created_at=utcnow())
        con.register("_scores", frame)
        con.execute("INSERT INTO tile_scores SELECT model, version, slide_id, tile_id, x, y, size, score_name, score, "
                    "created_at FROM _scores")
        con.unregister("_scores")


def _drawing_key(ws: Workspace, slide_id: str, tumor: LoadedHead, de: LoadedHead | None, genes: list[str],
                 out_dir: Path, smoothing: Smoothing) -> str:
    """A hash naming one drawing: slide, head versions, genes and folder (inside the workspace: relative, so a
    copied workspace finds its drawings). Only hex digits, so it is safe in an MLflow filter."""
    out = out_dir.resolve()
    where = out.relative_to(ws.root).as_posix() if out.is_relative_to(ws.root) else str(out)
    payload = [slide_id, tumor.version, de.version if de else None, list(genes), where]
    payload.extend(smoothing.key())  # drawings of raw attention keep the keys they had before smoothing existed
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:24]


def _already_drawn(catalog: Catalog, tracker: Tracker, slide_id: str, heads: tuple[LoadedHead, LoadedHead | None],
                   key: str, pictures: list[Path]) -> HeatmapResult | None:
    """The earlier drawing of this slide by exactly these head versions and genes into ``out_dir``, if its
    pictures are still there: its scores from ``tile_scores`` and its mask AUC from its MLflow run."""
    if not all(p.is_file() for p in pictures):
        return None
    runs = tracker.client.search_runs([tracker.experiment_id(EXPERIMENT)], max_results=1, order_by=["start_time DESC"],
                                      filter_string=f"tags.`histcode.drawing` = '{key}' and attributes.status = 'FINISHED'")
    if not runs:
        return None
    tumor, de = heads
    scores = pd.DataFrame(catalog.query(
        "SELECT slide_id, tile_id, x, y, size, score_name, score FROM tile_scores WHERE slide_id = ? AND "
        "((model = 'tumor-head' AND version = ?) OR (model = 'de-head' AND version = ?)) ORDER BY score_name, y, x",
        [slide_id, tumor.version, de.version if de else None]))
    return HeatmapResult(slide_id, pictures, runs[0].data.metrics.get("attention_mask_auc"), scores)


def render_heatmaps(ws: Workspace, slide_id: str, out_dir: Path, genes: list[str] | None = None,
                    alias: str = "attention", heads: tuple[LoadedHead, LoadedHead | None] | None = None,
                    bags: dict[str, Bag] | None = None, force: bool = False,
                    smoothing: Smoothing | None = None) -> HeatmapResult:
    """``heads``: the (tumour, DE) heads when the caller has loaded them already (default: tumour@``alias``
    and DE@best from the registry); ``bags``: the slide's vectors by view id, where already read (each head
    reads the slide in its own view); ``smoothing``: of the attention map (default heads.attention_smoothing and its passes).
    A slide already drawn by the same head versions and genes into ``out_dir`` is not drawn again unless
    ``force``."""
    catalog, tracker = Catalog.of(ws), Tracker(ws)
    slide = catalog.get_slide(slide_id)
    if slide is None or slide["status"] != "ok":
        raise LookupError(f"{slide_id} is not a registered, healthy slide")
    tumor, de = heads or (load_head(tracker, "tumor", alias), optional_head(tracker, "de"))
    chosen = (genes or list(de.genes[:2])) if de is not None and de.genes else []
    if de is not None:
        unknown = sorted(set(chosen) - set(de.genes))
        if unknown:
            raise LookupError(f"genes {unknown} are not in the DE head's panel {list(de.genes)}")
    views = {f"{h.task}-head v{h.version}": h.view_id for h in (tumor, de) if h is not None}
    smoothing = Smoothing.of(ws.config().heads) if smoothing is None else smoothing
    key = _drawing_key(ws, slide_id, tumor, de, chosen, out_dir, smoothing)
    stem = file_stem(slide_id)  # any id (quotes, slashes, any script) names a file inside out_dir
    pictures = [out_dir / f"{stem}.attention.png", *(out_dir / f"{stem}.{file_stem(g)}.png" for g in chosen)]
    done = None if force else _already_drawn(catalog, tracker, slide_id, (tumor, de), key, pictures)
    if done is not None:
        log.info("%s: heatmaps already drawn by these heads (%s)", slide_id, out_dir)
        done.views = views
        return done
    bags = dict(bags or {})
    bag = bags.get(tumor.view_id) or slide_bag(ws, tumor, slide_id)
    if not bag.has_tiles:
        raise LookupError(f"{tumor.task}-head v{tumor.version} reads view {tumor.view_id}, a slide encoder's one vector "
                          "per slide: there are no tiles to draw its attention on; draw heatmaps with a head of a tile "
                          "view (`histcode heatmap --alias ...`)")
    p_tumor, attention, raw = slide_attention(tumor, bag, smoothing)
    result = HeatmapResult(slide_id, views=views)
    result.pictures.append(heatmap_png(slide, bag.xy, bag.size, attention, f"attention (p_tumor {p_tumor:.2f})",
                                       "attention", pictures[0], kind="sequential",
                                       head=f"{tumor.task}-head v{tumor.version}"))
    rows = [{"slide_id": slide_id, "tile_id": t, "x": int(x), "y": int(y), "size": bag.size, "score_name": name,
             "score": float(a)} for name, values in (("attention", attention), ("attention_raw", raw))
            for t, (x, y), a in zip(bag.tile_ids, bag.xy, values)]
    result.mask_auc = slide_mask_auc(slide, bag, raw, smoothing)
    store_scores(catalog, tumor, pd.DataFrame(rows))
    if chosen:
        de_bag = bags.get(de.view_id) or (bag if de.view_id == tumor.view_id else slide_bag(ws, de, slide_id))
        if not de_bag.has_tiles:
            why = (f"{de.task}-head v{de.version} reads view {de.view_id}, a slide encoder's one vector per slide: it "
                   "has no per-tile log2FC to draw")
            if genes:
                raise LookupError(f"{why}; draw the attention alone (no --gene)")
            log.info("%s: %s; only the attention is drawn", slide_id, why)
            chosen, pictures = [], pictures[:1]
    if chosen:
        per_tile = de.tile_scores(de_bag.features)
        de_rows = []
        for gene, picture in zip(chosen, pictures[1:]):
            g = list(de.genes).index(gene)
            result.pictures.append(heatmap_png(slide, de_bag.xy, de_bag.size, per_tile[:, g],
                                               f"predicted log2FC of {gene} per tile", f"{gene} log2FC",
                                               picture, kind="diverging", head=f"{de.task}-head v{de.version}"))
            de_rows += [{"slide_id": slide_id, "tile_id": t, "x": int(x), "y": int(y), "size": de_bag.size,
                         "score_name": f"log2fc:{gene}", "score": float(v)}
                        for t, (x, y), v in zip(de_bag.tile_ids, de_bag.xy, per_tile[:, g])]
        store_scores(catalog, de, pd.DataFrame(de_rows))
        rows += de_rows
    result.scores = pd.DataFrame(rows)
    with tracker.run(EXPERIMENT, f"heatmap-{slide_id}", tags={
            "histcode.slide_id": slide_id, "histcode.tumor_head_version": tumor.version, "histcode.drawing": key}) as run:
        if result.mask_auc is not None:
            tracker.log_metrics(run, {"attention_mask_auc": result.mask_auc})
        for picture in result.pictures:
            tracker.log_artifact(run, picture, "heatmaps")
    return result
