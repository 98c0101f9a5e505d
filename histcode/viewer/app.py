"""The viewer's ASGI app (Starlette): a cohort page, a slide page with a deep-zoom viewer and overlays, and the
JSON and image endpoints behind them. Read-only over the workspace.

Every endpoint names a slide by catalog id (a query parameter, so any id, slashes and quotes included, travels
intact); an id the catalog does not have, a layer or a Deep Zoom address outside the slide, is a 404. No part of
a request becomes a file path: slide files come from the catalog, overlay pictures are drawn in memory, and the
static folders are served by Starlette's ``StaticFiles`` (which refuses paths outside them).

Search filters are structured clauses, never SQL text (``histcode.viewer.filters``); a search runs on a small
pool of its own under a time limit (``SEARCH_TIME_LIMIT_S``). Every request passes ``histcode.viewer.access``
first: its Host must be one the viewer answers for, and a shared viewer wants its token or its proxy's header.
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as SearchTimeout
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from histcode.store.vectors import SLIDE_KIND, TILE_KIND
from histcode.viewer.access import Access, AccessMiddleware
from histcode.viewer.cohort import BadFilter, UnknownItem, ViewerData
from histcode.viewer.cohort_query import CohortQuery, CohortQueryError
from histcode.viewer.deepzoom import DeepZoomTiles, TileNotFound
from histcode.viewer.filters import FilterRejected, describe, parse_clauses
from histcode.viewer.overlays import (
    grid_png,
    layer_legend,
    layer_png,
    placement,
    tissue_png,
)
from histcode.viewer.thumbnails import ThumbnailCache
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
MAX_K = 50
CACHE = {"Cache-Control": "max-age=3600"}
THUMBNAIL_PX = 160
SEARCH_TIME_LIMIT_S = 10.0  # a search still running after this is answered 503 (and finishes on its pool)
SEARCHES_AT_ONCE = 2  # searches run at once; as many more may wait, the rest are answered 503 at once


def datadocs_dir(ws: Workspace) -> Path | None:
    """The label gate's Data Docs site, where one was built."""
    from histcode.labels.run import gx_project

    site = gx_project(ws) / "gx" / "uncommitted" / "data_docs" / "local_site"
    return site if (site / "index.html").is_file() else None


def _int(request: Request, name: str, default: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None and default is not None:
        return default
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise HTTPException(400, f"{name} must be an integer, got {raw!r}") from None


def _float(request: Request, name: str) -> float:
    raw = request.query_params.get(name)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise HTTPException(400, f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise HTTPException(400, f"{name} must be finite")
    return value


def _clean(value):
    """JSON-safe: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is not None and not isinstance(value, str | int | float | bool):
        return str(value)
    return value


SURVIVAL_ROWS = """
    SELECT p.slide_id, s.patient_id, p.value AS risk, p.call
    FROM predictions p JOIN slides s USING (slide_id)
    WHERE p.task = 'survival' AND p.output = 'risk' AND p.source = 'cv' AND NOT p.stale AND p.value IS NOT NULL
      AND p.version = (SELECT max(version) FROM predictions WHERE task = 'survival' AND source = 'cv' AND NOT stale)
"""


def survival_groups(data: ViewerData):
    """One row per patient of the survival head's fresh out-of-fold predictions (the version ``@best`` names):
    its mean log-risk over its slides, the group its slides were called (high / low against their fold model's
    training median; the commoner call of its slides), time and event; None without such predictions. The
    predictions come from the viewer's snapshot, the survival labels from one read of the catalog."""
    import pandas as pd

    rows = pd.DataFrame(data.snapshot.query(SURVIVAL_ROWS, memo=True))
    if rows.empty:
        return None
    try:
        labels = pd.DataFrame(data.catalog.query("SELECT patient_id, time, event FROM survival_labels"),
                              columns=["patient_id", "time", "event"])
    except Exception as exc:  # noqa: BLE001 -- a catalog busy with a writer, or from before survival labels
        log.info("no survival picture: the catalog's survival labels cannot be read now (%s)", exc)
        return None
    rows = rows.merge(labels, on="patient_id", how="inner")
    if rows.empty:
        return None
    out = rows.groupby("patient_id", sort=True).agg(risk=("risk", "mean"), group=("call", lambda c: c.mode().iloc[0]),
                                                    time=("time", "first"), event=("event", "first"))
    return out.reset_index()


def survival_km_png(frame) -> bytes:
    """The Kaplan-Meier picture of the out-of-fold high vs low risk groups, with the log-rank p and the C-index."""
    import tempfile

    from histcode.heads import survival_metrics as sm
    from histcode.heads.survival import km_curves
    from histcode.viz.plots import kaplan_meier_png

    test = sm.logrank(frame.time, frame.event, frame.group == "high")
    note = (f"C-index {sm.c_index(frame.time, frame.event, frame.risk):.3f}, "
            f"log-rank p = {test.p:.3g}, {int(frame.event.sum())} events")
    with tempfile.TemporaryDirectory() as tmp:
        path = kaplan_meier_png(km_curves(frame), "survival head: out-of-fold risk groups", Path(tmp) / "km.png", note)
        return path.read_bytes()


def create_app(ws: Workspace, cache_dir: Path | None = None, access: Access | None = None,
               search_time_limit_s: float = SEARCH_TIME_LIMIT_S) -> Starlette:
    """The viewer over ``ws``. Nothing is computed at start: the cohort page reads the stored predictions (the
    catalog's ``predictions`` table) a page at a time, a slide's layers are computed when its page is opened.
    ``cache_dir``: where slide thumbnails are kept (default ``histcode.viewer.thumbnails.cache_root()``);
    ``access``: the Host names answered and the token or proxy header wanted (default: loopback names, no token)."""
    access = access or Access()
    data = ViewerData(ws)
    searches = ThreadPoolExecutor(max_workers=SEARCHES_AT_ONCE, thread_name_prefix="viewer-search")
    search_slots = threading.BoundedSemaphore(2 * SEARCHES_AT_ONCE)
    tiles = DeepZoomTiles()
    thumbnails = ThumbnailCache(cache_dir)
    templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    docs = datadocs_dir(ws)

    def page(name: str, **context) -> HTMLResponse:
        return HTMLResponse(templates.get_template(name).render(datadocs=docs is not None, **context))

    def view_of(request: Request):
        return data.view(request.query_params.get("view") or None)

    def slide_of(request: Request) -> dict:
        return data.slide(request.query_params.get("id"))

    def clauses_of(request: Request) -> list:
        try:
            return parse_clauses(request.query_params.multi_items())
        except FilterRejected as exc:
            raise HTTPException(400, str(exc)) from None

    def bounded(search):
        """``search()`` on the search pool, answered 503 past the time limit or when the pool is full."""
        if not search_slots.acquire(blocking=False):
            raise HTTPException(503, "the viewer is busy with other searches: try again in a moment")
        try:
            future = searches.submit(search)
        except BaseException:
            search_slots.release()
            raise
        future.add_done_callback(lambda _: search_slots.release())
        try:
            return future.result(timeout=search_time_limit_s)
        except SearchTimeout:
            raise HTTPException(503, f"the search took longer than {search_time_limit_s:g} s: narrow the filter "
                                     "or lower k") from None
        except BadFilter as exc:
            raise HTTPException(400, str(exc)) from None

    # -- pages ------------------------------------------------------------------------------------------------
    def cohort_page(request: Request) -> HTMLResponse:
        _, view = data.cohort_view(request.query_params.get("view") or None)
        return page("cohort.html", view=view, views=data.views(), workspace=str(ws.root),
                    survival=survival_groups(data) is not None)

    def slide_page(request: Request) -> HTMLResponse:
        slide = slide_of(request)
        view = view_of(request)
        return page("slide.html", slide=slide, view=view, views=data.views())

    # -- data -------------------------------------------------------------------------------------------------
    def api_slides(request: Request) -> JSONResponse:
        spec_id, view = data.cohort_view(request.query_params.get("view") or None)
        try:
            query = CohortQuery.from_params(request.query_params)
            page = data.cohort_page(spec_id, query)
        except CohortQueryError as exc:
            raise HTTPException(400, str(exc)) from None
        return JSONResponse(_clean({"view": view.view_id if view else None, "spec_id": spec_id,
                                    "heads": data.heads_shown(), "slides": page.pop("rows"), **page}))

    def api_slide(request: Request) -> JSONResponse:
        slide, view = slide_of(request), view_of(request)
        sid = slide["slide_id"]
        pyramid = tiles.pyramid(slide["path"])
        width, height = pyramid.width, pyramid.height
        overlays = []
        try:
            grid = data.grid(sid, view)
            overlays.append({"name": "grid", "label": "tile grid", "placement": placement(grid, width, height)})
        except UnknownItem:
            grid = None
        if data.tissue_mask(sid, view) is not None:
            overlays.append({"name": "tissue", "label": "tissue mask",
                             "placement": {"x": 0, "y": 0, "width": 1, "height": height / width}})
        for layer in data.layers(sid).values():
            overlays.append({"name": layer.name, "label": layer.label, "source": layer.source,
                             "placement": placement(layer.grid, width, height), "legend": layer_legend(layer)})
        return JSONResponse(_clean({
            "slide_id": sid, "patient_id": slide["patient_id"], "cohort": slide["cohort"], "mpp": slide["mpp_x"],
            "view": view.view_id, "tile_source": pyramid.as_tile_source(), "overlays": overlays,
            "n_tiles": len(grid.tile_ids) if grid else 0, "tile_size": grid.size if grid else None,
            "predictions": data.predictions(sid), "patient": data.patient_predictions(sid),
            "mask_auc": data.mask_auc(sid), "labels": data.labels(sid)}))

    def api_dz(request: Request) -> Response:
        slide = slide_of(request)
        try:
            jpeg = tiles.tile(slide["path"], _int(request, "level"), _int(request, "col"), _int(request, "row"))
        except TileNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return Response(jpeg, media_type="image/jpeg", headers=CACHE)

    def api_thumbnail(request: Request) -> Response:
        slide = slide_of(request)
        jpeg = thumbnails.get(slide.get("content_hash"), THUMBNAIL_PX,
                              lambda: tiles.thumbnail_jpeg(slide["path"], THUMBNAIL_PX))
        return Response(jpeg, media_type="image/jpeg", headers=CACHE)

    def api_overlay(request: Request) -> Response:
        slide, view = slide_of(request), view_of(request)
        name = request.query_params.get("layer", "")
        if name == "grid":
            png = grid_png(data.grid(slide["slide_id"], view))
        elif name == "tissue":
            mask = data.tissue_mask(slide["slide_id"], view)
            if mask is None:
                raise UnknownItem(f"slide {slide['slide_id']!r} has no tissue mask")
            png = tissue_png(mask)
        else:
            png = layer_png(data.layer(slide["slide_id"], name))
        return Response(png, media_type="image/png")

    def api_tile_at(request: Request) -> JSONResponse:
        slide, view = slide_of(request), view_of(request)
        grid = data.grid(slide["slide_id"], view)
        i = grid.index_at(_float(request, "x"), _float(request, "y"))
        if i is None:
            raise UnknownItem("no tile there")
        x, y = (int(v) for v in grid.xy[i])
        return JSONResponse({"tile_id": grid.tile_ids[i], "slide_id": slide["slide_id"], "x": x, "y": y, "size": grid.size})

    def api_neighbours(request: Request) -> JSONResponse:
        view = view_of(request)
        k = min(max(_int(request, "k", 8), 1), MAX_K)
        clauses = clauses_of(request)
        hits = bounded(lambda: data.neighbours(view, request.query_params.get("tile", ""), k, clauses))
        return JSONResponse(_clean({"view": view.view_id, "filter": [c.__dict__ for c in clauses], "hits": hits}))

    def api_filters(request: Request) -> JSONResponse:
        """The columns and operators a search filter of this view may use (tiles, and slides where it has them)."""
        view = view_of(request)
        out = {"view": view.view_id, "tile": None, "slide": None}
        for kind, key in ((TILE_KIND, "tile"), (SLIDE_KIND, "slide")):
            if kind == TILE_KIND and view.slide_level:
                continue
            try:
                out[key] = describe(data.filter_columns(view, kind))
            except UnknownItem:
                pass
        return JSONResponse(out)

    def api_tile_image(request: Request) -> Response:
        view = view_of(request)
        tile = data.tile(view, request.query_params.get("tile", ""))
        slide = data.slide(tile["slide_id"])
        jpeg = tiles.region_jpeg(slide["path"], int(tile["x"]), int(tile["y"]), int(tile["size"]))
        return Response(jpeg, media_type="image/jpeg", headers=CACHE)

    def api_similar(request: Request) -> JSONResponse:
        slide, view = slide_of(request), view_of(request)
        k = min(max(_int(request, "k", 5), 1), MAX_K)
        clauses = clauses_of(request)
        hits = bounded(lambda: data.similar_slides(view, slide["slide_id"], k, clauses))
        return JSONResponse(_clean({"view": view.view_id, "filter": [c.__dict__ for c in clauses], "hits": hits}))

    def api_survival(request: Request) -> Response:
        frame = survival_groups(data)
        if frame is None:
            raise HTTPException(404, "no out-of-fold survival predictions of histcode-survival-head@best to draw")
        return Response(survival_km_png(frame), media_type="image/png")

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=404)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    routes = [
        Route("/", cohort_page), Route("/slide", slide_page),
        Route("/api/slides", api_slides), Route("/api/slide", api_slide), Route("/api/dz", api_dz),
        Route("/api/thumbnail", api_thumbnail), Route("/api/overlay", api_overlay), Route("/api/tile-at", api_tile_at),
        Route("/api/neighbours", api_neighbours), Route("/api/tile-image", api_tile_image),
        Route("/api/similar", api_similar), Route("/api/filters", api_filters),
        Route("/api/survival-km.png", api_survival),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    if docs is not None:
        routes.append(Mount("/datadocs", StaticFiles(directory=docs, html=True), name="datadocs"))
    app = Starlette(routes=routes, exception_handlers={UnknownItem: not_found, HTTPException: http_error},
                    middleware=[Middleware(AccessMiddleware, access=access)])
    app.state.data, app.state.tiles, app.state.access = data, tiles, access
    return app
