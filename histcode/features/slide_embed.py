"""Materialise a slide encoder's vectors: a tile view's tiles, per slide, through a published slide encoder, into
the slide table of a new, slide-level feature view.

The new view (``registry.slide_view_of``) is derived from the tile view: model ``slide:<encoder>``, version
``<tile view id>.<weights hash>``, the tile view's tiling spec. It has a slide table only, which slide search,
retrieval, the heads (one-vector bags: ``histcode.heads.data.load_bags``) and the viewer's slide list read like
the pooled vectors of any view. The slide encoder must read the tile encoder it was trained on: a tile view made
by another encoder (registered from ``FOUNDATION`` or imported from TRIDENT under another name) is refused by
name, as is one whose tiles lie at another pitch than the encoder's grid (``SlideEncoderSpec.patch_um``). TITAN's
grid counts the view's tiles from the slide's smallest corner (``patch_size_lv0`` = the tile's level-0 size, as
TRIDENT passes it); GigaPath's floors level-0 microns by ``patch_um``.

As ``histcode embed`` does, slides are written ``features.commit_every_slides`` at a time: the Lance commit
first (an upsert on the slide id), the ledger rows second, so a process killed in between leaves rows the rerun
rewrites in place; a slide whose vectors cannot be encoded (no tiles, non-finite vectors, no microns per pixel)
gets a failed ledger row with the reason and the others go on. A rerun encodes only the slides the tile view has
finished since (or re-embedded with other content).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from histcode.config import HistcodeConfig
from histcode.features.embed import EmbedOutcome
from histcode.features.read import slide_chunks, slide_features, view_table
from histcode.features.registry import (
    FeatureView,
    done_slides,
    record_materializations,
    register_view,
    resolve_view,
    set_view_status,
    slide_view_of,
)
from histcode.features.upkeep import maintain_tables
from histcode.runtime import resolve_device
from histcode.ssl.encoders import EncoderError
from histcode.ssl.slide_encoders import SlideEncoderSpec, build_slide_encoder, grid_cells, slide_encoder_spec
from histcode.ssl.titan import tile_cells
from histcode.ssl.weights import check_cache_blob, load_slide_encoder, locate_weights, read_state_dict
from histcode.store.catalog import Catalog
from histcode.store.records import utcnow
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, connect, open_table, to_batch, upsert_slides
from histcode.tracking import Tracker
from histcode.workspace import Workspace
from histcode.wsi.files import file_sha256

log = logging.getLogger(__name__)

PITCH_TOLERANCE = 0.1  # relative difference allowed between the tiles' pitch and the encoder's grid cell


@dataclass
class SlideEmbedReport:
    encoder: str
    source: FeatureView
    view: FeatureView
    weights: Path
    outcomes: list[EmbedOutcome] = field(default_factory=list)
    seconds: float = 0.0
    versions: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> list[EmbedOutcome]:
        return [o for o in self.outcomes if o.action == "failed"]

    def count(self, action: str) -> int:
        return sum(o.action == action for o in self.outcomes)


def tile_encoder_of(view: FeatureView) -> str:
    """What made a tile view's vectors, as its view says: ``foundation:<name>`` for a registered foundation
    encoder, ``trident:<name>`` for an import, else the encoder's method (``adco``, ...)."""
    if (view.method or "").startswith("imported:"):
        return view.model_name
    return view.method or view.model_name


def check_source(spec: SlideEncoderSpec, view: FeatureView) -> None:
    """The tile view must be the slide encoder's tile encoder's, at its width; EncoderError naming both."""
    if view.slide_level:
        raise EncoderError(f"view {view.view_id} is itself a slide-level view ({view.model_name}); pass the tile view "
                           f"{view.source_view_id}")
    made_by = tile_encoder_of(view)
    accepted = {f"foundation:{spec.tile_encoder}", *(f"trident:{n}" for n in spec.trident_names)}
    if made_by not in accepted:
        raise EncoderError(
            f"slide encoder {spec.name} ({spec.title}) reads {spec.tile_encoder} tile features (a view of "
            f"`histcode encoders register {spec.tile_encoder}`, or imported from TRIDENT as "
            f"{' or '.join(spec.trident_names)}); view {view.view_id} was made by {made_by} "
            f"({view.model_name}/{view.model_version})")
    if view.dim != spec.in_dim:
        raise EncoderError(f"slide encoder {spec.name} reads {spec.in_dim}-d tile features; view {view.view_id} "
                           f"holds {view.dim}-d vectors")


def load_slide_module(spec: SlideEncoderSpec, weights: Path) -> tuple[torch.nn.Module, Path, str]:
    """The entry built on meta and loaded strictly from ``weights`` (a file, a folder, a Hugging Face cache):
    (module in eval mode, the file, its SHA-256)."""
    path = locate_weights(spec, weights)
    sha = file_sha256(path, 1 << 24)
    check_cache_blob(path, sha)  # a tampered or truncated Hugging Face cache file is refused by name
    module = build_slide_encoder(spec.name, weightless=True)
    load_slide_encoder(spec, module, read_state_dict(path), str(path))
    return module.eval(), path, sha


def encode_slide(module: torch.nn.Module, spec: SlideEncoderSpec, vectors: np.ndarray, x: np.ndarray,
                 y: np.ndarray, size: int, mpp: float | None, device: torch.device) -> np.ndarray:
    """One slide's vector from its tiles' vectors and level-0 corners; EncoderError with the reason if the slide
    cannot be encoded."""
    if len(vectors) == 0:
        raise EncoderError("no tile vectors")
    if not np.isfinite(vectors).all():
        raise EncoderError(f"{int((~np.isfinite(vectors)).any(axis=1).sum())} tile vectors are not finite")
    if spec.patch_um is not None:
        if not mpp or mpp <= 0:
            raise EncoderError("the slide has no microns per pixel: its tiles cannot be placed on the encoder's grid")
        pitch = size * mpp
        if abs(pitch / spec.patch_um - 1) > PITCH_TOLERANCE:
            raise EncoderError(f"tiles lie {pitch:.4g} um apart; {spec.name} was trained on tiles {spec.patch_um:.4g} "
                               f"um apart: tile the slides at that pitch (tiling.tile_px x tiling.target_mpp) and "
                               "embed them again")
        cells = tile_cells(x, y, size) if spec.tile_grid else grid_cells(x * mpp, y * mpp, spec.patch_um)
    else:
        cells = grid_cells(x, y, None)
    with torch.inference_mode():
        out = module(torch.tensor(np.asarray(vectors, np.float32))[None].to(device), cells.to(device))
    out = out.float().cpu().numpy()[0]
    if out.shape != (spec.dim,) or not np.isfinite(out).all():
        raise EncoderError(f"the encoder gave shape {out.shape} (expects ({spec.dim},)) or non-finite values")
    return out


def embed_slides(ws: Workspace, cfg: HistcodeConfig, encoder: str, weights: Path, source_view: str | None = None,
                 slide_ids: list[str] | None = None) -> SlideEmbedReport:
    """Encode every slide of the tile view ``source_view`` (default: the default view) that the slide-level view
    lacks, and write it; returns what happened to each slide."""
    spec = slide_encoder_spec(encoder)
    if spec.refused:
        raise EncoderError(f"slide encoder {spec.name} ({spec.title}) is listed but not built: {spec.refused}")
    catalog, tracker = Catalog.of(ws), Tracker(ws)
    source = resolve_view(catalog, tracker, cfg, source_view)
    check_source(spec, source)
    module, path, sha = load_slide_module(spec, weights)
    device = resolve_device(cfg.features.device)
    module = module.to(device)
    view = slide_view_of(source, spec.name, spec.dim, sha)
    register_view(catalog, view)
    report = SlideEmbedReport(spec.name, source, view, path)

    finished = done_slides(catalog, source.view_id)  # the tile view's slides, by content hash
    if slide_ids is not None:
        report.outcomes += [EmbedOutcome(s, "failed", reason=f"not materialised in tile view {source.view_id}")
                            for s in sorted(set(slide_ids) - set(finished))]
        finished = {s: h for s, h in finished.items() if s in set(slide_ids)}
    done = done_slides(catalog, view.view_id)
    todo = sorted(s for s, h in finished.items() if done.get(s) != h)
    report.outcomes += [EmbedOutcome(s, "skipped") for s in sorted(finished) if s not in set(todo)]
    table = open_table(connect(ws.lancedb_uri), view.table(SLIDE_KIND))
    log.info("slide view %s (%s over %s): %d slides to encode, %d done", view.view_id, spec.name, source.view_id,
             len(todo), len(finished) - len(todo))
    start = time.perf_counter()
    if todo:
        writer = SlideRowWriter(ws, cfg, view, table, finished, report)
        meta = _slide_meta(ws, source, todo)
        mpp = {s["slide_id"]: s.get("mpp_x") for s in catalog.slides()}
        tiles = view_table(ws, source, TILE_KIND)
        seen: set[str] = set()
        for chunk in slide_chunks(tiles, todo):
            sids = chunk.column("slide_id").to_numpy(zero_copy_only=False)
            column = chunk.column("vector").combine_chunks()
            vectors = column.values.to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
            x, y = chunk.column("x").to_numpy(), chunk.column("y").to_numpy()
            sizes = chunk.column("size").to_numpy()
            starts = np.flatnonzero(np.r_[True, sids[1:] != sids[:-1]])
            for a, b in zip(starts, np.r_[starts[1:], len(sids)]):
                sid = str(sids[a])
                seen.add(sid)
                try:
                    vector = encode_slide(module, spec, vectors[a:b], x[a:b], y[a:b], int(sizes[a]), mpp.get(sid),
                                          device)
                    writer.add(sid, meta[sid], int(b - a), vector)
                except EncoderError as exc:
                    writer.fail(sid, str(exc))
        for sid in sorted(set(todo) - seen):  # finished in the ledger, but no rows in the tile table
            writer.fail(sid, f"no tile vectors in view {source.view_id}")
        writer.flush()
    report.seconds = time.perf_counter() - start
    set_view_status(catalog, view.view_id, "ok" if not report.failed else "partial")
    maintain_tables({SLIDE_KIND: table}, cfg.features, changed=bool(todo))
    report.versions = {SLIDE_KIND: table.version}
    report.outcomes.sort(key=lambda o: o.slide_id)
    return report


def _slide_meta(ws: Workspace, source: FeatureView, slide_ids: list[str]) -> dict[str, dict]:
    """patient_id and the attribute columns of each slide, from the tile view's slide table."""
    rows = slide_features(ws, source, slide_ids=slide_ids).drop_columns(["vector"]).to_pylist()
    return {r["slide_id"]: r for r in rows}


class SlideRowWriter:
    """Encoded slides into the slide-level view's table ``features.commit_every_slides`` at a time (one Lance
    commit), then their ledger rows; a failed slide gets its ledger row with the reason and no vector."""

    def __init__(self, ws: Workspace, cfg: HistcodeConfig, view: FeatureView, table, hashes: dict[str, str],
                 report: SlideEmbedReport) -> None:
        self.ws, self.cfg, self.view, self.table, self.hashes, self.report = ws, cfg, view, table, hashes, report
        self.pending: list[tuple[str, dict, int, np.ndarray]] = []
        self.failures: list[dict] = []
        self.started = utcnow()

    def add(self, slide_id: str, meta: dict, n_tiles: int, vector: np.ndarray) -> None:
        self.pending.append((slide_id, meta, n_tiles, vector))
        if len(self.pending) >= self.cfg.features.commit_every_slides:
            self.flush()

    def fail(self, slide_id: str, reason: str) -> None:
        log.warning("%s: not encoded by %s: %s", slide_id, self.report.encoder, reason)
        self.report.outcomes.append(EmbedOutcome(slide_id, "failed", reason=reason))
        self.failures.append({"slide_id": slide_id, "content_hash": self.hashes[slide_id], "rows": 0,
                              "status": "failed", "error": reason, "started_at": self.started})

    def flush(self) -> None:
        ledger, self.failures = self.failures, []
        if self.pending:
            spec = self.view.table(SLIDE_KIND)
            columns: dict[str, list] = {"slide_id": [], "patient_id": [], "n_tiles": [],
                                        **{c: [] for c in self.view.attribute_columns}}
            for sid, meta, n, _ in self.pending:
                columns["slide_id"].append(sid)
                columns["patient_id"].append(meta.get("patient_id"))
                columns["n_tiles"].append(n)
                for c in self.view.attribute_columns:
                    columns[c].append(meta.get(c))
            columns["vector"] = np.stack([v for *_, v in self.pending])
            sids = columns["slide_id"]
            version = upsert_slides(self.table, spec, to_batch(spec, columns), sids)
            for sid, _, n, _ in self.pending:
                self.report.outcomes.append(EmbedOutcome(sid, "embedded", 1))
                ledger.append({"slide_id": sid, "content_hash": self.hashes[sid], "rows": 1, "status": "ok",
                               "lance_version": version, "started_at": self.started})
        if ledger:
            record_materializations(Catalog.of(self.ws), self.view.view_id, ledger, {SLIDE_KIND: self.table})
        self.pending = []


def describe_report(report: SlideEmbedReport) -> dict:
    """The report as plain data (for `--format json`)."""
    return {"encoder": report.encoder, "view_id": report.view.view_id, "source_view_id": report.source.view_id,
            "weights": str(report.weights), "dim": report.view.dim, "embedded": report.count("embedded"),
            "skipped": report.count("skipped"), "failed": [o.__dict__ for o in report.failed],
            "seconds": round(report.seconds, 3), "versions": report.versions}

