"""What the viewer shows, read from a workspace without writing to it: the cohort's slides with their labels and
the registered heads' predictions, a slide's tile grid and per-tile scores (attention, each gene's log2FC), its
ground-truth mask, and the feature store's neighbours of a tile or a slide.

Slides are known by catalog id only; anything else is ``UnknownItem`` (the app answers 404). Heads are applied
in the view each was trained on (its ``view_id`` tag); search runs in the view the user picked. Results that
cost a model pass (predictions, a slide's scores) are computed once per process and kept.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histcode.apps.predict import registered_heads, score_slide
from histcode.features.read import view_table
from histcode.features.registry import FeatureView, list_views, load_view, resolve_view
from histcode.features.search import SearchError, TileSearcher, nearest_slides
from histcode.heads.apply import HeadNotFound, LoadedHead
from histcode.heads.data import Bag, load_bags
from histcode.heads.masks import tile_tumour_labels
from histcode.heads.smoothing import Smoothing
from histcode.store.catalog import Catalog
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, quote_literal
from histcode.tracking import Tracker
from histcode.workspace import Workspace
from histcode.wsi.grid import Grid, grid_of

log = logging.getLogger(__name__)

SLIDES_TTL_S = 15.0  # the catalog's slides are read again after this long (another process may add some)


class UnknownItem(LookupError):
    """A slide, view, tile or layer the workspace does not have."""


@dataclass(frozen=True)
class Layer:
    """One overlay: per-tile ``scores`` on the grid of the view it was computed in."""

    name: str
    label: str
    kind: str  # "sequential" (attention, probabilities) or "diverging" (log2FC)
    grid: Grid
    scores: np.ndarray
    source: str  # the head and view it comes from


class ViewerData:
    """Read-only access to one workspace for the viewer (thread-safe; one per app)."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.cfg = ws.config()
        self.catalog = Catalog.of(ws)
        self.tracker = Tracker(ws)
        self._lock = threading.RLock()
        self._slides: dict[str, dict] = {}
        self._slides_at = 0.0
        self._heads: dict[str, LoadedHead] | None = None
        self._bags: dict[str, dict[str, Bag]] = {}  # view id -> slide id -> bag
        self._predictions: dict[str, dict] | None = None
        self._layers: dict[str, dict[str, Layer]] = {}
        self._searchers: dict[str, TileSearcher] = {}

    # -- slides and views ------------------------------------------------------------------------------------
    def slides(self) -> dict[str, dict]:
        with self._lock:
            if time.monotonic() - self._slides_at > SLIDES_TTL_S:
                self._slides = {s["slide_id"]: s for s in self.catalog.slides()}
                self._slides_at = time.monotonic()
            return self._slides

    def slide(self, slide_id: str | None) -> dict:
        """A healthy registered slide, or ``UnknownItem``."""
        slide = self.slides().get(slide_id or "")
        if slide is None or slide["status"] != "ok":
            raise UnknownItem(f"no slide {slide_id!r} in the catalog")
        return slide

    def views(self) -> list[dict]:
        """The materialised tile views, newest first."""
        return [v for v in list_views(self.catalog) if v["status"] in ("ok", "partial")]

    def view(self, view_id: str | None) -> FeatureView:
        """``view_id``, or the workspace's default view (features.encoder's), else the newest materialised."""
        known = {v["view_id"] for v in self.views()}
        if view_id:
            if view_id not in known:
                raise UnknownItem(f"no materialised feature view {view_id!r}")
            return load_view(self.catalog, view_id, self.cfg.features.attribute_columns)
        try:
            return resolve_view(self.catalog, self.tracker, self.cfg)
        except (LookupError, ValueError):
            if not known:
                raise UnknownItem("no materialised feature view: run `histcode embed`") from None
            return load_view(self.catalog, None, self.cfg.features.attribute_columns)

    # -- heads and predictions ---------------------------------------------------------------------------------
    def heads(self) -> dict[str, LoadedHead]:
        with self._lock:
            if self._heads is None:
                try:
                    self._heads = registered_heads(self.tracker)
                except HeadNotFound as exc:
                    log.info("no heads to show: %s", exc)
                    self._heads = {}
            return self._heads

    def bags(self, view_id: str) -> dict[str, Bag]:
        """Every slide's bag in ``view_id`` (read once, memory-mapped)."""
        with self._lock:
            if view_id not in self._bags:
                view = load_view(self.catalog, view_id)
                self._bags[view_id] = load_bags(self.ws, view)
            return self._bags[view_id]

    def predictions(self) -> dict[str, dict]:
        """Per slide: p_tumor, the subtype probabilities and the DE calls of the registered heads (empty when no
        head is registered, or for a slide missing from a head's view)."""
        with self._lock:
            if self._predictions is None:
                heads, out = self.heads(), {}
                if heads:
                    views = {h.view_id for h in heads.values()}
                    by_view = {v: self.bags(v) for v in views}
                    for sid in set.intersection(*(set(b) for b in by_view.values())):
                        out[sid], _ = score_slide({v: b[sid] for v, b in by_view.items()}, heads)
                self._predictions = out
            return self._predictions

    def labels(self) -> dict[str, dict]:
        rows = self.catalog.query("SELECT slide_id, tumor, subtype FROM slide_labels") if self._has("slide_labels") else []
        return {r["slide_id"]: r for r in rows}

    def _has(self, table: str) -> bool:
        return bool(self.catalog.query("SELECT 1 FROM information_schema.tables WHERE table_name = ?", [table]))

    def cohort_rows(self, view: FeatureView) -> list[dict]:
        """One row per registered slide: id, cohort, status, scale, tiles in ``view``'s tiling, labels, predictions."""
        counts = {r["slide_id"]: r["n_tiles"] for r in self.catalog.query(
            "SELECT slide_id, n_tiles FROM tilings WHERE spec_id = ? AND status = 'ok'", [view.spec_id])}
        labels, predictions = self.labels(), self.predictions()
        rows = []
        for sid, s in sorted(self.slides().items()):
            label, pred = labels.get(sid, {}), predictions.get(sid, {})
            rows.append({"slide_id": sid, "patient_id": s["patient_id"], "cohort": s["cohort"], "status": s["status"],
                         "reason": s["reason"], "mpp": s["mpp_x"], "width": s["width"], "height": s["height"],
                         "n_tiles": counts.get(sid), "tumor": label.get("tumor"), "subtype": label.get("subtype"),
                         **pred})
        return rows

    # -- a slide's grid and layers ------------------------------------------------------------------------------
    def grid(self, slide_id: str, view: FeatureView) -> Grid:
        """The slide's tiles in ``view``'s tiling spec (from the catalog: no vectors read)."""
        self.slide(slide_id)
        tiles = self.catalog.tiles(slide_id, view.spec_id)
        if tiles.num_rows == 0:
            raise UnknownItem(f"slide {slide_id!r} has no tiles in tiling spec {view.spec_id}")
        xy = np.stack([tiles.column("x").to_numpy(), tiles.column("y").to_numpy()], axis=1)
        return grid_of(tiles.column("tile_id").to_pylist(), xy, int(tiles.column("size")[0].as_py()))

    def layers(self, slide_id: str) -> dict[str, Layer]:
        """The slide's score layers: the tumour head's attention and each DE gene's per-tile log2FC."""
        slide = self.slide(slide_id)
        with self._lock:
            if slide_id in self._layers:
                return self._layers[slide_id]
            heads, layers = self.heads(), {}
            att = heads.get("attention")
            if att is not None and slide_id in self.bags(att.view_id):
                bag = self.bags(att.view_id)[slide_id]
                _, raw = att(bag.features)  # drawn as every heatmap is: smoothed over the tile grid
                attention = Smoothing.of(self.cfg.heads).apply(raw, bag.xy, bag.size)
                layers["attention"] = Layer("attention", "attention", "sequential", grid_of(bag.tile_ids, bag.xy, bag.size),
                                            np.asarray(attention, dtype=float), f"tumor-head v{att.version} ({att.view_id})")
                truth = tile_tumour_labels(slide, bag)
                if truth is not None:
                    layers["truth"] = Layer("truth", "ground-truth tumour", "sequential",
                                            layers["attention"].grid, truth.astype(float), "the slide's mask")
            de = heads.get("de")
            if de is not None and de.genes and slide_id in self.bags(de.view_id):
                bag = self.bags(de.view_id)[slide_id]
                per_tile = de.tile_scores(bag.features)
                grid = grid_of(bag.tile_ids, bag.xy, bag.size)
                for g, gene in enumerate(de.genes):
                    layers[f"gene:{gene}"] = Layer(f"gene:{gene}", f"{gene} log2FC", "diverging", grid,
                                                   np.asarray(per_tile[:, g], dtype=float), f"de-head v{de.version} ({de.view_id})")
            self._layers[slide_id] = layers
            return layers

    def layer(self, slide_id: str, name: str) -> Layer:
        layer = self.layers(slide_id).get(name)
        if layer is None:
            raise UnknownItem(f"slide {slide_id!r} has no layer {name!r}")
        return layer

    def mask_auc(self, slide_id: str) -> float | None:
        """AUC of the tumour head's attention against the slide's ground-truth tumour tiles (None without both)."""
        layers = self.layers(slide_id)
        if "attention" not in layers or "truth" not in layers:
            return None
        truth = layers["truth"].scores > 0.5
        if truth.all() or not truth.any():
            return None
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(truth, layers["attention"].scores))

    def tissue_mask(self, slide_id: str, view: FeatureView) -> Path | None:
        """The tissue mask the tiling drew (a PNG at thumbnail resolution), where there is one."""
        self.slide(slide_id)
        row = self.catalog.tiling(slide_id, view.spec_id)
        path = row and row.get("mask_path")
        return Path(path) if path and Path(path).is_file() else None

    # -- search ---------------------------------------------------------------------------------------------------
    def _searcher(self, view: FeatureView) -> TileSearcher:
        with self._lock:
            if view.view_id not in self._searchers:
                self._searchers[view.view_id] = TileSearcher(view_table(self.ws, view, TILE_KIND), self.cfg.features)
            return self._searchers[view.view_id]

    def tile(self, view: FeatureView, tile_id: str) -> dict:
        """A tile of ``view`` by id: slide, corner, size and vector; ``UnknownItem`` when the view has none."""
        searcher = self._searcher(view)
        rows = searcher.dataset.to_table(columns=["tile_id", "slide_id", "x", "y", "size", "vector"],
                                         filter=f"tile_id = {quote_literal(tile_id)}")
        if rows.num_rows == 0:
            raise UnknownItem(f"no tile {tile_id!r} in view {view.view_id}")
        row = rows.slice(0, 1).to_pylist()[0]
        row["vector"] = np.asarray(row["vector"], dtype=np.float32)
        return row

    def neighbours(self, view: FeatureView, tile_id: str, k: int, where: str | None) -> list[dict]:
        """The ``k`` tiles of the cohort nearest to ``tile_id`` in ``view`` (cosine), among those ``where``
        selects; ``SearchError`` for a bad filter."""
        tile = self.tile(view, tile_id)
        searcher = self._searcher(view)
        hits = searcher.with_sizes(searcher.nearest(tile["vector"], k, where, exclude=tile_id))
        keep = [c for c in ("rank", "tile_id", "slide_id", "patient_id", "x", "y", "size", "distance") if c in hits.column_names]
        return hits.select(keep).to_pylist()

    def similar_slides(self, view: FeatureView, slide_id: str, k: int, where: str | None = None) -> list[dict]:
        self.slide(slide_id)
        try:
            table = view_table(self.ws, view, SLIDE_KIND)
        except Exception as exc:  # noqa: BLE001 -- no slide table in this view yet
            raise UnknownItem(f"view {view.view_id} has no slide vectors") from exc
        hits = nearest_slides(table, slide_id, k, where, "mean", view)
        return hits.to_pylist()


__all__ = ["Layer", "SearchError", "UnknownItem", "ViewerData"]
