"""What the viewer shows, read from a workspace without writing to it: the cohort's slides with their labels and
the stored predictions (``histcode.store.predictions``: `histcode predict`'s, and the cross-validation's out-of-fold
ones for training slides), a slide's tile grid and per-tile scores (attention, each gene's log2FC), its
ground-truth mask, and the feature store's neighbours of a tile or a slide.

Slides are known by catalog id only; anything else is ``UnknownItem`` (the app answers 404). The cohort page is
one SQL query per page (``histcode.viewer.cohort_query``), whatever the cohort's size. A slide's score layers are
computed when its page asks for them, by the heads in the view each was trained on (its ``view_id`` tag), from
that slide's vectors alone, and kept for the last few slides; search runs in the view the user picked.
"""

from __future__ import annotations

import logging
import shlex
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import duckdb
import numpy as np

from histcode.features.registry import FeatureView, list_views, load_view, resolve_view
from histcode.store.catalog import Catalog
from histcode.store.patient_predictions import CURRENT_PATIENT_SQL
from histcode.store.predictions import CURRENT_SQL
from histcode.tiling.spec import spec_id_of
from histcode.viewer.cohort_query import CohortQuery
from histcode.viewer.snapshot import CatalogSnapshot
from histcode.workspace import Workspace
from histcode.wsi.grid import Grid, grid_of

if TYPE_CHECKING:  # the models, vectors and MLflow are imported when a slide's layers or a search first need them,
    # so that the viewer starts (and serves the cohort) without loading torch, Lance or MLflow
    from histcode.features.search import TileSearcher
    from histcode.heads.apply import LoadedHead
    from histcode.heads.data import Bag
    from histcode.tracking import Tracker

log = logging.getLogger(__name__)

SLIDES_TTL_S = 15.0  # the default feature view is looked up again after this long
BAGS_KEPT = 8  # slides' bags kept (a slide page asks for its layers, then overlays, tiles, search)
LAYERS_KEPT = 64  # slides whose score layers are kept


class UnknownItem(LookupError):
    """A slide, view, tile or layer the workspace does not have."""


class BadFilter(ValueError):
    """A search filter the feature store refused; the message says why."""


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
    """Read-only access to one workspace for the viewer (thread-safe; one per app). Nothing is computed at start:
    the cohort page is a SQL query per page over the catalog (its slides, labels and stored predictions,
    ``histcode.store.predictions``), a slide's score layers are computed when its page asks for them."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.cfg = ws.config()
        self.catalog = Catalog.of(ws)
        self._tracker: Tracker | None = None
        self._lock = threading.RLock()
        self.snapshot = CatalogSnapshot(self.catalog, {
            "current_predictions": CURRENT_SQL.format(table="predictions") + " ORDER BY slide_id, output"})
        self._heads: dict[str, LoadedHead] | None = None
        self._bags: dict[tuple[str, str], Bag] = {}  # (view id, slide id) -> bag, the last few slides opened
        self._layers: dict[str, dict[str, Layer]] = {}
        self._searchers: dict[str, TileSearcher] = {}
        self._default: tuple[float, FeatureView | None] = (0.0, None)
        self._looking = False

    @property
    def tracker(self) -> Tracker:
        with self._lock:
            if self._tracker is None:
                from histcode.tracking import Tracker

                self._tracker = Tracker(self.ws, read_only=True)  # a viewer relocates nothing, writes nothing
            return self._tracker

    # -- slides and views ------------------------------------------------------------------------------------
    def slide(self, slide_id: str | None) -> dict:
        """A healthy registered slide, or ``UnknownItem``."""
        rows = self.snapshot.query("SELECT * FROM slides WHERE slide_id = ?", [slide_id or ""])
        if not rows or rows[0]["status"] != "ok":
            raise UnknownItem(f"no slide {slide_id!r} in the catalog")
        return self.catalog.resolved(rows[0])

    def views(self) -> list[dict]:
        """The materialised tile views, newest first."""
        return [v for v in list_views(self.snapshot) if v["status"] in ("ok", "partial")]

    def view(self, view_id: str | None) -> FeatureView:
        """``view_id``, or the workspace's default view (features.encoder's, kept for ``SLIDES_TTL_S``), else the
        newest materialised."""
        if view_id:
            known = {v["view_id"] for v in self.views()}
            if view_id not in known:
                raise UnknownItem(f"no materialised feature view {view_id!r}")
            return load_view(self.snapshot, view_id, self.cfg.features.attribute_columns)
        with self._lock:
            at, default = self._default
        if default is not None and time.monotonic() - at <= SLIDES_TTL_S:
            return default
        try:
            if self.ws.mlflow_is_local and not (self.ws.mlruns_dir / "mlflow.db").is_file():
                raise LookupError("no model registry in this workspace")  # and a viewer creates none
            default = resolve_view(self.catalog, self.tracker, self.cfg)
        except (LookupError, ValueError):
            if not self.views():
                raise UnknownItem("no materialised feature view: run `histcode embed`") from None
            default = load_view(self.catalog, None, self.cfg.features.attribute_columns)
        with self._lock:
            self._default = (time.monotonic(), default)
        return default

    def cohort_view(self, view_id: str | None) -> tuple[str, FeatureView | None]:
        """(tiling spec, view) of the cohort page: the named view, else the default view once it is known, else
        the current tiling spec and no view yet. Finding the default view needs the model registry (MLflow);
        the first page does not wait for it: it is looked up in the background, for the pages after, and the
        heads are loaded after it."""
        if view_id:
            view = self.view(view_id)
            return view.spec_id, view
        with self._lock:
            at, default = self._default
            looking = self._looking
            if default is None and not looking:
                self._looking = True
        if default is not None:
            return default.spec_id, default
        if not looking:
            threading.Thread(target=self._find_default, name="viewer-default-view", daemon=True).start()
        return spec_id_of(self.cfg.tiling), None

    def _find_default(self) -> None:
        """The default view, then the registered heads loaded, so that the first slide page finds them ready
        (started after the first cohort page was answered: the start-up never waits for it)."""
        try:
            self.view(None)
        except Exception as exc:  # noqa: BLE001 -- the page says which view it shows; the log says why none
            log.info("no default feature view: %s", exc)
        finally:
            with self._lock:
                self._looking = False
        try:
            for head in self.heads().values():
                head.model  # noqa: B018 -- loads the registered module once
        except Exception as exc:  # noqa: BLE001 -- a slide page says what is missing; the log says why
            log.info("heads not loaded ahead of the slide pages: %s", exc)

    # -- heads and predictions ---------------------------------------------------------------------------------
    def heads(self) -> dict[str, LoadedHead]:
        """The registered heads, loaded when a slide's layers are first asked for."""
        with self._lock:
            if self._heads is None:
                from histcode.apps.predict import registered_heads
                from histcode.heads.apply import HeadNotFound

                try:
                    self._heads = registered_heads(self.tracker)
                except HeadNotFound as exc:
                    log.info("no heads to show: %s", exc)
                    self._heads = {}
            return self._heads

    def bag(self, view_id: str, slide_id: str) -> Bag | None:
        """One slide's bag in ``view_id`` (read from the view's table for that slide alone; the last few kept)."""
        key = (view_id, slide_id)
        with self._lock:
            if key not in self._bags:
                from histcode.heads.data import load_bags

                view = load_view(self.catalog, view_id)
                # its memory maps' files in a temporary folder: the viewer writes nothing in the workspace
                bags = load_bags(self.ws, view, slide_ids=[slide_id], spill_dir=Path(tempfile.gettempdir()))
                bag = bags.get(slide_id)
                if len(self._bags) >= BAGS_KEPT:
                    self._bags.pop(next(iter(self._bags)))
                self._bags[key] = bag
            return self._bags[key]

    def predictions(self, slide_id: str) -> dict:
        """The slide's stored predictions (``current_predictions``): ``values`` output -> number (DE: its call),
        ``by`` one entry per head version and source they come from, and ``note``: what is missing or stale and
        the command that makes them."""
        self.slide(slide_id)
        rows = self.snapshot.query("SELECT * FROM current_predictions WHERE slide_id = ? ORDER BY task, output", [slide_id])
        values = {r["output"]: r["call"] if r["output"].startswith("de_") else r["value"] for r in rows}
        by = {}
        for r in rows:
            by.setdefault((r["task"], r["version"], r["source"]), {
                "task": r["task"], "model": r["model"], "version": r["version"], "aggregator": r["aggregator"],
                "view_id": r["view_id"], "source": r["source"], "fold": r["fold"], "stale": bool(r["stale"]),
                "predicted_at": r["predicted_at"], "in_distribution": r["in_distribution"],
                "ood_score": r["ood_score"]})
        command = f"histcode predict --refresh --slide {shlex.quote(slide_id)}"
        note = None
        if not rows:
            note = f"no stored predictions for this slide: {command}"
        elif any(b["stale"] for b in by.values()):
            note = f"predicted by a head version that is no longer @best: {command}"
        return {"values": values, "by": list(by.values()), "note": note, "command": command if note else None}

    def patient_predictions(self, slide_id: str) -> dict:
        """The slide's patient's pooled predictions (``current_patient_predictions``): ``values`` output -> number
        (DE: its call), ``by`` one entry per (task, version, source) with the pooling and the slides pooled; {}
        when none is stored (a catalog from before patient-level rows, or a patient not yet pooled)."""
        patient = self.slide(slide_id)["patient_id"] or slide_id
        try:
            rows = self.snapshot.query(f"SELECT * FROM ({CURRENT_PATIENT_SQL.format(table='patient_predictions')}) "
                                       "WHERE patient_id = ? ORDER BY task, output", [patient])
        except duckdb.CatalogException:  # a catalog without the table
            return {}
        if not rows:
            return {}
        by = {}
        for r in rows:
            by.setdefault((r["task"], r["version"], r["source"]), {
                "task": r["task"], "version": r["version"], "source": r["source"], "pooling": r["pooling"],
                "n_slides": r["n_slides"], "slide_ids": list(r["slide_ids"] or []), "stale": bool(r["stale"])})
        return {"patient_id": patient,
                "values": {r["output"]: r["call"] if r["output"].startswith("de_") else r["value"] for r in rows},
                "calls": {r["output"]: r["call"] for r in rows if r["call"] is not None},
                "by": list(by.values())}

    def prediction_outputs(self) -> list[str]:
        """The outputs the stored predictions have (columns of the cohort page)."""
        return [r["output"] for r in self.snapshot.query("SELECT DISTINCT output FROM current_predictions ORDER BY output",
                                                         memo=True)]

    def heads_shown(self) -> list[dict]:
        """Which head versions the stored predictions come from, with their slide counts."""
        return self.snapshot.query(
            "SELECT task, version, aggregator, source, bool_or(stale) AS stale, count(DISTINCT slide_id) AS slides "
            "FROM predictions GROUP BY ALL ORDER BY task, source, version DESC", memo=True)

    def labels(self, slide_id: str) -> dict:
        rows = self.snapshot.query("SELECT tumor, subtype FROM slide_labels WHERE slide_id = ? LIMIT 1", [slide_id])
        return rows[0] if rows else {}

    def cohort_page(self, spec_id: str, page: CohortQuery) -> dict:
        """One page of the cohort table, sorted and filtered in SQL: ``rows`` (slide, patient, cohort, status,
        scale, tiles in tiling ``spec_id``, labels, the stored predictions), ``total`` slides, ``matched`` by the
        filter, and the ``outputs`` that can be sorted on."""
        outputs = self.prediction_outputs()
        sql, params = page.sql(spec_id, outputs)
        with self.snapshot.connection() as con:
            cur = con.execute(sql, params)
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
            total = con.execute("SELECT count(*) FROM slides").fetchall()[0][0]
            ids = [r["slide_id"] for r in rows]
            preds = con.execute("SELECT slide_id, output, value, call, stale FROM current_predictions WHERE slide_id IN "
                                f"({', '.join('?' * len(ids))})", ids).fetchall() if ids else []
            pnames = [d[0] for d in con.description] if ids else []
        matched = rows[0].pop("_matched") if rows else 0
        by_slide: dict[str, dict] = {}
        for values in preds:
            r = dict(zip(pnames, values))
            by_slide.setdefault(r["slide_id"], {})[r["output"]] = r["call"] if r["output"].startswith("de_") else r["value"]
            if r["stale"]:
                by_slide[r["slide_id"]]["stale"] = True
        for r in rows:
            r.pop("_matched", None)
            r.pop("_key", None)
            r.update(by_slide.get(r["slide_id"], {}))
        return {"rows": rows, "total": int(total), "matched": int(matched), "outputs": outputs,
                "offset": page.offset, "limit": page.limit}

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
            from histcode.heads.masks import tile_tumour_labels
            from histcode.heads.smoothing import Smoothing

            heads, layers = self.heads(), {}
            att = heads.get("attention")
            bag = self.bag(att.view_id, slide_id) if att is not None else None
            if bag is not None and bag.has_tiles:  # a slide encoder's view has no tiles to draw on
                _, raw = att(bag.features)  # drawn as every heatmap is: smoothed over the tile grid
                attention = Smoothing.of(self.cfg.heads).apply(raw, bag.xy, bag.size)
                layers["attention"] = Layer("attention", "attention", "sequential", grid_of(bag.tile_ids, bag.xy, bag.size),
                                            np.asarray(attention, dtype=float), f"tumor-head v{att.version} ({att.view_id})")
                truth = tile_tumour_labels(slide, bag)
                if truth is not None:
                    layers["truth"] = Layer("truth", "ground-truth tumour", "sequential",
                                            layers["attention"].grid, truth.astype(float), "the slide's mask")
            de = heads.get("de")
            bag = self.bag(de.view_id, slide_id) if de is not None and de.genes else None
            if bag is not None and bag.has_tiles:
                per_tile = de.tile_scores(bag.features)
                grid = grid_of(bag.tile_ids, bag.xy, bag.size)
                for g, gene in enumerate(de.genes):
                    layers[f"gene:{gene}"] = Layer(f"gene:{gene}", f"{gene} log2FC", "diverging", grid,
                                                   np.asarray(per_tile[:, g], dtype=float), f"de-head v{de.version} ({de.view_id})")
            if len(self._layers) >= LAYERS_KEPT:
                self._layers.pop(next(iter(self._layers)))
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
    def committed_version(self, view: FeatureView, kind: str) -> int | None:
        """The version of the view's ``kind`` table at the catalog's last ledger commit (what SQL and search read,
        ``histcode.store.agreement``): vectors of a write the ledger never recorded stay unseen here too. None for
        a catalog from before versions were recorded (the latest is read)."""
        try:
            rows = self.snapshot.query("SELECT version FROM vector_versions WHERE lance_table = ?",
                                       [view.table(kind).name])
        except duckdb.CatalogException:  # a catalog without the table
            return None
        return int(rows[0]["version"]) if rows else None

    def _searcher(self, view: FeatureView) -> TileSearcher:
        from histcode.store.vectors import TILE_KIND

        version = self.committed_version(view, TILE_KIND)
        key = f"{view.view_id}@{version}"  # a new ledger commit: a searcher over the new version
        with self._lock:
            if key not in self._searchers:
                from histcode.features.read import view_table
                from histcode.features.search import TileSearcher

                for old in [k for k in self._searchers if k.startswith(f"{view.view_id}@")]:
                    self._searchers.pop(old)
                self._searchers[key] = TileSearcher(view_table(self.ws, view, TILE_KIND, version), self.cfg.features)
            return self._searchers[key]

    def tile(self, view: FeatureView, tile_id: str) -> dict:
        """A tile of ``view`` by id: slide, corner, size and vector; ``UnknownItem`` when the view has none."""
        from histcode.store.vectors import quote_literal

        searcher = self._searcher(view)
        rows = searcher.dataset.to_table(columns=["tile_id", "slide_id", "x", "y", "size", "vector"],
                                         filter=f"tile_id = {quote_literal(tile_id)}")
        if rows.num_rows == 0:
            raise UnknownItem(f"no tile {tile_id!r} in view {view.view_id}")
        row = rows.slice(0, 1).to_pylist()[0]
        row["vector"] = np.asarray(row["vector"], dtype=np.float32)
        return row

    def filter_columns(self, view: FeatureView, kind: str) -> dict[str, str]:
        """The columns a search filter may name in ``view``'s table of ``kind`` (``filters.allowed_columns``)."""
        from histcode.store.vectors import TILE_KIND
        from histcode.viewer.filters import allowed_columns

        schema = self._searcher(view).dataset.schema if kind == TILE_KIND else self._slide_table(view).schema
        return allowed_columns(schema, kind, view.attribute_columns)

    def _slide_table(self, view: FeatureView):
        from histcode.features.read import view_table
        from histcode.store.vectors import SLIDE_KIND

        try:
            return view_table(self.ws, view, SLIDE_KIND, self.committed_version(view, SLIDE_KIND))
        except Exception as exc:  # noqa: BLE001 -- no slide table in this view yet
            raise UnknownItem(f"view {view.view_id} has no slide vectors") from exc

    def neighbours(self, view: FeatureView, tile_id: str, k: int, clauses: list | None = None) -> list[dict]:
        """The ``k`` tiles of the cohort nearest to ``tile_id`` in ``view`` (cosine), among those the structured
        filter ``clauses`` (``histcode.viewer.filters``) selects; ``BadFilter`` for a filter refused."""
        from histcode.store.vectors import TILE_KIND

        tile = self.tile(view, tile_id)
        searcher = self._searcher(view)
        where = self._where(view, TILE_KIND, clauses)
        hits = self._searched(view, lambda: searcher.with_sizes(searcher.nearest(tile["vector"], k, where, exclude=tile_id)))
        keep = [c for c in ("rank", "tile_id", "slide_id", "patient_id", "x", "y", "size", "distance") if c in hits.column_names]
        return hits.select(keep).to_pylist()

    def similar_slides(self, view: FeatureView, slide_id: str, k: int, clauses: list | None = None) -> list[dict]:
        from histcode.features.search import nearest_slides
        from histcode.store.vectors import SLIDE_KIND

        self.slide(slide_id)
        table = self._slide_table(view)
        where = self._where(view, SLIDE_KIND, clauses)
        return self._searched(view, lambda: nearest_slides(table, slide_id, k, where, "mean", view)).to_pylist()

    def _where(self, view: FeatureView, kind: str, clauses: list | None) -> str | None:
        from histcode.viewer.filters import FilterRejected, compile_clauses

        if not clauses:
            return None
        try:
            return compile_clauses(clauses, self.filter_columns(view, kind))
        except FilterRejected as exc:
            raise BadFilter(str(exc)) from None

    @staticmethod
    def _searched(view: FeatureView, search):
        """``search()``, its failures told in HistCode's words: a filter the store refused is a short reason
        without the store's own text (its hidden columns, source paths), which goes to the log."""
        from histcode.features.search import FilterError, SearchError

        try:
            return search()
        except FilterError as exc:
            log.info("search filter refused in view %s: %s", view.view_id, exc)
            raise BadFilter(f"the filter cannot be applied in view {view.view_id}") from None
        except SearchError as exc:
            raise BadFilter(str(exc)) from None


__all__ = ["BadFilter", "Layer", "UnknownItem", "ViewerData"]
