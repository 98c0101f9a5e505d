"""Materialise a feature view: embed every tile of every finished slide with a registered encoder, write
tile and slide vectors to LanceDB, record each slide in the catalog's ledger.

Slides are embedded in slide order by a DataLoader (reader processes hide slide reads behind the model where
cores allow) and written ``commit_every_slides`` at a time, one Lance commit per table per batch of slides,
never per tile. The Lance commit comes first and the ledger row second: a process killed in between leaves
rows that the rerun rewrites in place (upserts on the id), so a kill at any point followed by a rerun ends with
exactly one row per tile. A slide whose tiles cannot be read is marked failed with the reason; the others go on.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from histcode.config import HistcodeConfig
from histcode.features.registry import (
    FeatureView,
    describe_view,
    done_slides,
    record_materializations,
    register_view,
    resolve_encoder,
    set_view_status,
)
from histcode.features.upkeep import maintain_tables
from histcode.ssl.dataset import TileDataset, dataset_from_catalog
from histcode.ssl.stain_norm import normalise_dataset, parse as parse_stain_norm

from histcode.store.catalog import Catalog
from histcode.store.records import utcnow
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, connect, open_table, to_batch, upsert_slides
from histcode.tiling.spec import spec_id_of
from histcode.tracking import Tracker
from histcode.workspace import Workspace
from histcode.wsi.reader import SlideReadError
from histcode.runtime import failpoint, resolve_device, resolve_workers

log = logging.getLogger(__name__)


@dataclass
class EmbedOutcome:
    slide_id: str
    action: str  # embedded | skipped | failed
    rows: int = 0
    reason: str | None = None


@dataclass
class EmbedReport:
    view: FeatureView
    outcomes: list[EmbedOutcome] = field(default_factory=list)
    seconds: float = 0.0
    tiles_embedded: int = 0
    versions: dict[str, int] = field(default_factory=dict)  # Lance table versions after this run
    maintenance: list[str] = field(default_factory=list)  # compaction / index / tag notes

    @property
    def failed(self) -> list[EmbedOutcome]:
        return [o for o in self.outcomes if o.action == "failed"]

    def count(self, action: str) -> int:
        return sum(o.action == action for o in self.outcomes)

    @property
    def tiles_per_s(self) -> float:
        return self.tiles_embedded / self.seconds if self.seconds else 0.0


class _ReadOrReport(Dataset):
    """Tiles with their index; a tile that cannot be read comes back blank with the error, so one bad slide
    fails alone instead of stopping the DataLoader."""

    def __init__(self, tiles: TileDataset) -> None:
        self.tiles = tiles

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int):
        try:
            return i, self.tiles[i], ""
        except SlideReadError as exc:
            return i, torch.zeros(3, self.tiles.tile_px, self.tiles.tile_px, dtype=torch.uint8), str(exc)


def _attributes(slide: dict, columns: tuple[str, ...]) -> dict[str, str | None]:
    attrs = json.loads(slide["attributes"]) if slide.get("attributes") else {}
    return {c: (attrs.get(c) or None) for c in columns}


def materialize(ws: Workspace, cfg: HistcodeConfig, encoder: str | None = None, slide_ids: list[str] | None = None,
                tag: str | None = None, progress: bool = True) -> EmbedReport:
    fcfg = cfg.features
    catalog, tracker = Catalog.of(ws), Tracker(ws)
    spec_id = spec_id_of(cfg.tiling)
    view = describe_view(tracker, encoder or fcfg.encoder, spec_id, fcfg.attribute_columns)
    register_view(catalog, view)
    report = EmbedReport(view)
    slides = {s["slide_id"]: s for s in catalog.tiled_slides(spec_id)}
    if slide_ids is not None:
        missing = sorted(set(slide_ids) - set(slides))
        report.outcomes += [EmbedOutcome(s, "failed", reason="not ingested and tiled under the current spec")
                            for s in missing]
        slides = {k: v for k, v in slides.items() if k in set(slide_ids)}
    done = done_slides(catalog, view.view_id)
    todo = [sid for sid, s in slides.items() if done.get(sid) != s["content_hash"]]
    report.outcomes += [EmbedOutcome(sid, "skipped") for sid in slides if sid not in todo]
    db = connect(ws.lancedb_uri)
    tables = {kind: open_table(db, view.table(kind)) for kind in (TILE_KIND, SLIDE_KIND)}
    log.info("view %s (%s, spec %s): %d slides to embed, %d done", view.view_id, view.encoder_uri, spec_id,
             len(todo), len(slides) - len(todo))
    if todo:
        _embed(tracker, view, cfg, catalog, slides, todo, tables, report, progress)
    status = "ok" if not report.failed else "partial"
    set_view_status(catalog, view.view_id, status)
    report.maintenance = maintain_tables(tables, fcfg, changed=bool(todo), tag=tag)
    report.versions = {kind: t.version for kind, t in tables.items()}
    report.outcomes.sort(key=lambda o: o.slide_id)
    return report


def _embed(tracker: Tracker, view: FeatureView, cfg: HistcodeConfig, catalog: Catalog, slides: dict[str, dict],
           todo: list[str], tables: dict, report: EmbedReport, progress: bool) -> None:
    fcfg = cfg.features
    device = resolve_device(fcfg.device)
    model = tracker.load_model(view.encoder_uri).to(device)  # an exported graph: already in inference mode
    dataset = dataset_from_catalog(catalog, view.spec_id, view.image_px, slide_ids=todo)
    tags = resolve_encoder(tracker, view.encoder_uri)[2]  # the encoder's version tags say how it reads tiles
    normalise_dataset(dataset, parse_stain_norm(tags.get("stain_norm")))
    order = [s.slide_id for s in dataset.slides]
    counts = np.bincount(dataset.tiles[:, 0], minlength=len(order))
    vectors: dict[int, list[tuple[int, np.ndarray]]] = {}
    errors: dict[int, str] = {}
    pending: list[int] = []
    started = utcnow()
    workers = resolve_workers(fcfg.num_workers, device)
    # this process holds Lance handles, and Lance is not fork-safe: reader processes are spawned
    loader = DataLoader(_ReadOrReport(dataset), batch_size=fcfg.batch_size, shuffle=False, num_workers=workers,
                        multiprocessing_context="spawn" if workers else None, persistent_workers=False)
    bar = tqdm(total=len(dataset), desc=f"embed {view.view_id}", unit="tile", disable=not progress)
    start = time.perf_counter()  # throughput counts reading, embedding and writing, not loading the model
    try:
        for index, pixels, error in loader:
            with torch.inference_mode():
                out = model(pixels.to(device).float() / 255.0).float().cpu().numpy()
            for i, vec, err in zip(index.tolist(), out, error):
                slide = int(dataset.tiles[i, 0])
                if err:
                    errors.setdefault(slide, err)
                vectors.setdefault(slide, []).append((i, vec))
                if len(vectors[slide]) == counts[slide]:
                    pending.append(slide)
            if len(pending) >= fcfg.commit_every_slides:
                _flush(view, dataset, slides, order, pending, vectors, errors, tables, catalog, report, started)
            bar.update(len(index))
        _flush(view, dataset, slides, order, pending, vectors, errors, tables, catalog, report, started)
    finally:
        report.seconds = time.perf_counter() - start
        bar.close()
        dataset.close()


def _flush(view: FeatureView, dataset: TileDataset, slides: dict[str, dict], order: list[str], pending: list[int],
           vectors: dict, errors: dict, tables: dict, catalog: Catalog, report: EmbedReport, started) -> None:
    """Write the finished slides: tiles and slide vectors (one commit per table), then their ledger rows."""
    if not pending:
        return
    good = [s for s in pending if s not in errors]
    ledger = []
    for s in pending:
        if s in errors:
            sid = order[s]
            log.warning("%s: not embedded: %s", sid, errors[s])
            report.outcomes.append(EmbedOutcome(sid, "failed", reason=errors[s]))
            ledger.append({"slide_id": sid, "content_hash": slides[sid]["content_hash"], "rows": 0, "status": "failed",
                           "error": errors[s], "started_at": started})
    if good:
        tile_cols: dict[str, list] = {k: [] for k in ("tile_id", "slide_id", "patient_id", "x", "y", "size", "vector")}
        slide_cols: dict[str, list] = {k: [] for k in ("slide_id", "patient_id", "n_tiles", "vector")}
        attrs = {c: [] for c in view.attribute_columns}
        tile_attrs = {c: [] for c in view.attribute_columns}
        for s in good:
            sid = order[s]
            rows = sorted(vectors[s], key=lambda r: r[0])
            idx = [r[0] for r in rows]
            vecs = np.stack([r[1] for r in rows])
            meta = slides[sid]
            a = _attributes(meta, view.attribute_columns)
            tile_cols["tile_id"] += [dataset.tile_ids[i] for i in idx]
            tile_cols["slide_id"] += [sid] * len(idx)
            tile_cols["patient_id"] += [meta["patient_id"]] * len(idx)
            tile_cols["x"] += dataset.tiles[idx, 1].tolist()
            tile_cols["y"] += dataset.tiles[idx, 2].tolist()
            tile_cols["size"] += [dataset.slides[s].size] * len(idx)
            tile_cols["vector"].append(vecs)
            for c in view.attribute_columns:
                tile_attrs[c] += [a[c]] * len(idx)
                attrs[c].append(a[c])
            slide_cols["slide_id"].append(sid)
            slide_cols["patient_id"].append(meta["patient_id"])
            slide_cols["n_tiles"].append(len(idx))
            slide_cols["vector"].append(vecs.mean(axis=0))
        tile_cols["vector"] = np.concatenate(tile_cols["vector"])
        slide_cols["vector"] = np.stack(slide_cols["vector"])
        sids = [order[s] for s in good]
        tile_version = upsert_slides(tables[TILE_KIND], view.table(TILE_KIND), to_batch(view.table(TILE_KIND), {**tile_cols, **tile_attrs}), sids)
        upsert_slides(tables[SLIDE_KIND], view.table(SLIDE_KIND), to_batch(view.table(SLIDE_KIND), {**slide_cols, **attrs}), sids)
        failpoint("embed.committed")  # vectors written, ledger not yet: a rerun rewrites them in place
        for s in good:
            sid = order[s]
            n = len(vectors[s])
            report.outcomes.append(EmbedOutcome(sid, "embedded", n))
            report.tiles_embedded += n
            ledger.append({"slide_id": sid, "content_hash": slides[sid]["content_hash"], "rows": n, "status": "ok",
                           "lance_version": tile_version, "started_at": started})
    record_materializations(catalog, view.view_id, ledger)
    for s in pending:
        vectors.pop(s, None)
    pending.clear()
