"""`histcode export geojson SLIDE`: a slide's tiles in a view's grid as QuPath objects.

QuPath (``qupath.lib.io.PathObjectTypeAdapters``, v0.4+) reads a ``FeatureCollection`` whose features each have
an ``id`` (a UUID), a ``geometry`` in level-0 pixel coordinates, and ``properties`` with ``objectType`` (``tile``
or ``detection``), optionally ``name``, ``classification`` (``{"name", "color": [r, g, b]}``), ``measurements``
(a map of name to number) and ``metadata`` (a map of name to text). Each tile is a closed square ring.

Measurements are what is known per tile: the tissue fraction of HistCode's own tiling; every score a heatmap
run stored in ``tile_scores`` for the tile (``<model> v<version> <score>``); and, where a registered head
(``@best``) reads this view and has no stored scores for the slide, its scores computed now: the tumour head's
attention (smoothed as heatmaps draw it, and raw), each class's per-tile probability, which also gives the
tile's classification, and the DE head's per-tile log2FC per gene. The ids are UUIDs derived from the view and
tile id, so exporting again gives the same objects.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histcode.config import HistcodeConfig
from histcode.exchange.h5files import ExchangeError
from histcode.features.registry import FeatureView
from histcode.store.catalog import Catalog
from histcode.workspace import Workspace, file_stem

log = logging.getLogger(__name__)

OBJECT_TYPES = ("tile", "detection")
CLASS_COLOURS = {"tumor": [200, 0, 0], "normal": [0, 150, 0]}  # other classes get QuPath's own colours
NAMESPACE = uuid.UUID("5f3c1d2e-8a4b-4c6d-9e0f-7a1b2c3d4e5f")  # HistCode's namespace for tile object ids


@dataclass
class GeoJsonExport:
    path: Path
    tiles: int
    measurements: list[str] = field(default_factory=list)
    classified: int = 0
    heads: list[str] = field(default_factory=list)  # the heads whose scores were computed now


def _square(x: int, y: int, size: int) -> dict:
    ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
    return {"type": "Polygon", "coordinates": [ring]}


def _stored_scores(catalog: Catalog, slide_id: str, tile_ids: set[str]) -> tuple[dict, set[tuple[str, str]]]:
    """tile_id -> {measurement: value} from ``tile_scores``, and the (model, version) pairs found."""
    rows = catalog.query("SELECT model, version, tile_id, score_name, score FROM tile_scores WHERE slide_id = ? "
                         "ORDER BY model, version, score_name", [slide_id])
    out: dict[str, dict[str, float]] = defaultdict(dict)
    heads = set()
    for r in rows:
        if r["tile_id"] in tile_ids and r["score"] is not None and np.isfinite(r["score"]):
            out[r["tile_id"]][f"{r['model']} v{r['version']} {r['score_name']}"] = float(r["score"])
            heads.add((r["model"], str(r["version"])))
    return out, heads


def _live_heads(ws: Workspace, view: FeatureView) -> list:
    """The registered @best heads that read ``view`` (none without a model registry: nothing is created)."""
    if ws.mlflow_is_local and not (ws.mlruns_dir / "mlflow.db").is_file():
        return []
    from histcode.heads.apply import HeadNotFound, load_head
    from histcode.tracking import Tracker

    tracker, heads = Tracker(ws), []
    for task in ("tumor", "de"):
        try:
            head = load_head(tracker, task, "best")
        except HeadNotFound:
            continue
        if head.view_id == view.view_id:
            heads.append(head)
    return heads


def _computed_scores(ws: Workspace, cfg: HistcodeConfig, view: FeatureView, slide_id: str, heads: list,
                     ) -> tuple[dict, dict, list[str]]:
    """tile_id -> measurements and tile_id -> class name from the heads run on the slide's bag now."""
    from histcode.apps.heatmaps import slide_attention
    from histcode.heads.data import load_bags
    from histcode.heads.smoothing import Smoothing

    bag = load_bags(ws, view, slide_ids=[slide_id]).get(slide_id) if heads else None
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    calls: dict[str, str] = {}
    used = []
    if bag is None:
        return scores, calls, used
    ids = list(bag.tile_ids)
    for head in heads:
        label = f"{head.task}-head v{head.version}"
        used.append(label)
        per_tile = np.asarray(head.tile_scores(bag.features), dtype=float)
        if head.task == "tumor":
            _, smoothed, raw = slide_attention(head, bag, Smoothing.of(cfg.heads))
            for i, tid in enumerate(ids):
                scores[tid][f"{label} attention"] = float(smoothed[i])
                scores[tid][f"{label} attention_raw"] = float(raw[i])
                for c, name in enumerate(head.classes):
                    scores[tid][f"{label} p({name})"] = float(per_tile[i, c])
                calls[tid] = head.classes[int(np.argmax(per_tile[i]))]
        else:
            for g, gene in enumerate(head.genes):
                for i, tid in enumerate(ids):
                    scores[tid][f"{label} {gene} log2FC"] = float(per_tile[i, g])
    return scores, calls, used


def export_geojson(ws: Workspace, cfg: HistcodeConfig, slide_id: str, view: FeatureView, out: Path | None = None,
                   object_type: str = "tile", heads: bool | Sequence = True) -> GeoJsonExport:
    """Write the slide's tiles in ``view``'s grid as a QuPath FeatureCollection (default:
    outputs/exchange/<slide>.geojson). ``heads``: True scores with the registered @best heads that read ``view``,
    False with none, or a list of loaded heads (``histcode.heads.apply.LoadedHead``) to score with."""
    if object_type not in OBJECT_TYPES:
        raise ExchangeError(f"object type {object_type!r} is not one of {', '.join(OBJECT_TYPES)}")
    catalog = Catalog.of(ws)
    if catalog.get_slide(slide_id) is None:
        raise ExchangeError(f"no slide {slide_id!r} in the catalog")
    tiles = catalog.tiles(slide_id, view.spec_id).to_pylist()
    if not tiles:
        raise ExchangeError(f"slide {slide_id!r} has no tiles in the grid of view {view.view_id} (spec {view.spec_id})")
    ids = {t["tile_id"] for t in tiles}
    stored, stored_heads = _stored_scores(catalog, slide_id, ids)
    chosen = _live_heads(ws, view) if heads is True else list(heads or [])
    other = [f"{h.task}-head v{h.version} ({h.view_id})" for h in chosen if h.view_id != view.view_id]
    if other:
        raise ExchangeError(f"heads {', '.join(other)} read another view than {view.view_id}")
    live = [h for h in chosen if (f"{h.task}-head", str(h.version)) not in stored_heads]
    computed, calls, used = _computed_scores(ws, cfg, view, slide_id, live)
    features, names = [], set()
    for t in tiles:
        tid = t["tile_id"]
        measurements = {}
        if t.get("tissue_fraction") is not None:
            measurements["tissue fraction"] = float(t["tissue_fraction"])
        measurements.update(stored.get(tid, {}))
        measurements.update(computed.get(tid, {}))
        names.update(measurements)
        properties = {"objectType": object_type, "name": tid,
                      "metadata": {"tile_id": tid, "slide_id": slide_id, "view_id": view.view_id}}
        if tid in calls:
            properties["classification"] = {"name": calls[tid], **({"color": CLASS_COLOURS[calls[tid]]}
                                                                    if calls[tid] in CLASS_COLOURS else {})}
        if measurements:
            properties["measurements"] = measurements
        features.append({"type": "Feature", "id": str(uuid.uuid5(NAMESPACE, f"{view.view_id}/{tid}")),
                         "geometry": _square(int(t["x"]), int(t["y"]), int(t["size"])), "properties": properties})
    path = Path(out) if out is not None else ws.outputs_dir / "exchange" / f"{file_stem(slide_id)}.geojson"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}, allow_nan=False))
    os.replace(tmp, path)
    log.info("%s: %d tiles of view %s written to %s", slide_id, len(features), view.view_id, path)
    return GeoJsonExport(path, len(features), sorted(names), len(calls), used)
