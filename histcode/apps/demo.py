"""The demo pipeline: build the demo cohort, ingest it, tile it, label the expression and gate the labels,
pretrain an encoder, embed every tile into a feature view, cross-validate and register the heads, draw a heatmap. Every stage skips work that is already done, so a rerun is quick."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from histcode.config import HistcodeConfig
from histcode.demo.build import DemoCohort, build_demo_cohort
from histcode.ingest.run import IngestReport, ingest_sources
from histcode.ingest.sources import read_manifest
from histcode.reports import (
    embed_summary,
    gate_summary,
    ingest_summary,
    labels_summary,
    tiling_summary,
    write_heads_report,
    write_json,
)
from histcode.store.catalog import Catalog
from histcode.tiling.run import TilingReport, tile_slides
from histcode.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class DemoOutcome:
    cohort: DemoCohort
    ingest: IngestReport
    tiling: TilingReport
    pretrain: dict | None = None  # metrics/pretrain.json's content
    pretrain_reused: bool = False
    embed: dict | None = None  # metrics/embed.json's content
    labels: dict | None = None  # metrics/labels.json's content
    gate: dict | None = None  # metrics/label_gate.json's content
    heads: dict | None = None  # metrics/heads.json's content
    heatmap: object | None = None  # the HeatmapResult of one tumour slide
    retrieval: dict | None = None  # metrics/retrieval.json: slide retrieval by tissue, per pooling

    @property
    def failed(self) -> bool:
        return bool(self.ingest.failed or self.tiling.failed or (self.gate is not None and not self.gate["passed"]))


def run_demo(ws: Workspace, cfg: HistcodeConfig, workers: int = 2) -> DemoOutcome:
    source = ws.path(cfg.demo.source_dir) if cfg.demo.source_dir else None
    cohort = build_demo_cohort(cfg.demo, ws.path(cfg.demo.out_dir), source, workers=workers)
    catalog = Catalog.of(ws)
    ingest = ingest_sources(read_manifest(cohort.manifest), catalog, cfg.ingest, cohort=cfg.demo.cohort)
    write_json(ws.metrics_dir / "ingest.json", ingest_summary(ingest))
    tiling = tile_slides(catalog, cfg.tiling, ws.outputs_dir / "qc")
    write_json(ws.metrics_dir / "tiling.json", tiling_summary(tiling))
    outcome = DemoOutcome(cohort, ingest, tiling)
    if outcome.failed:
        return outcome
    # labels first: they need only the tiled slides, and pretrain.exclude_test_folds needs their folds
    from histcode.labels.run import gate_labels, ingest_labels

    outcome.labels = labels_summary(ingest_labels(ws, cfg, outcome.cohort.out_dir / "expression.tsv"))
    write_json(ws.metrics_dir / "labels.json", outcome.labels)
    outcome.gate = gate_summary(gate_labels(ws, cfg))
    write_json(ws.metrics_dir / "label_gate.json", outcome.gate)
    if not outcome.gate["passed"]:
        return outcome
    from histcode.apps.pretraining import pretrain_or_reuse

    outcome.pretrain, outcome.pretrain_reused = pretrain_or_reuse(ws, cfg)
    from histcode.features.embed import materialize

    encoder = f"{cfg.pretrain.register_as}/{outcome.pretrain['version']}"
    embedded = materialize(ws, cfg, encoder=encoder)
    outcome.embed = embed_summary(embedded)
    write_json(ws.metrics_dir / "embed.json", outcome.embed)
    from histcode.apps.heatmaps import render_heatmaps
    from histcode.apps.train_heads import completed_heads, train_heads

    done = completed_heads(ws, cfg, ws.metrics_dir / "heads.json")
    if done is not None:
        log.info("heads are up to date: %s", ws.metrics_dir / "heads.json")
        outcome.heads = {**done, "reused": True}
    else:
        outcome.heads = write_heads_report(train_heads(ws, cfg), ws.metrics_dir / "heads.json", ws.metrics_dir / "plots")
    outcome.retrieval = slide_retrieval(ws, cfg, embedded.view, reuse=bool(outcome.heads.get("reused")))
    tumour_slides = sorted(s for s, t in zip(*_tumour_slides(ws)) if t)
    if tumour_slides:
        outcome.heatmap = render_heatmaps(ws, tumour_slides[0], ws.outputs_dir / "heatmaps")
    return outcome


def slide_retrieval(ws: Workspace, cfg: HistcodeConfig, view, reuse: bool) -> dict:
    """Leave-one-patient-out slide retrieval by tissue (normal / LUAD / LUSC), mean and attention pooling (each
    slide pooled by its out-of-fold attention: the final head would be in-sample), each logged to MLflow
    (experiment ``retrieval``) and kept in metrics/retrieval.json; reused while the heads and the view are
    unchanged."""
    from histcode.apps.slide_vectors import POOLINGS, PoolingError, slide_vectors
    from histcode.features.retrieval import evaluate_view, log_retrieval
    from histcode.tracking import Tracker

    path = ws.metrics_dir / "retrieval.json"
    if reuse and path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("view_id") == view.view_id:
            return {**kept, "reused": True}
    out: dict = {"view_id": view.view_id, "by": "tissue", "k": 5, "poolings": {}}
    tracker = Tracker(ws)
    for pooling in POOLINGS:
        try:
            vectors = slide_vectors(ws, view, pooling, source="out_of_fold")
        except PoolingError as exc:
            log.info("retrieval with %s pooling skipped: %s", pooling, exc)
            continue
        try:
            report = evaluate_view(ws, view, by="tissue", k=5, cohorts=cfg.cohorts.train, vectors=vectors)
        except ValueError as exc:  # e.g. a cohort with labelled slides of one patient only
            log.info("retrieval with %s pooling skipped: %s", pooling, exc)
            continue
        source = "out_of_fold" if pooling == "attention" else None
        run_id = log_retrieval(tracker, view, report, {"pooling": pooling, "cohorts": cfg.cohorts.train,
                                                       "attention_source": source})
        metrics = report.metrics()
        out["poolings"][pooling] = {"run_id": run_id, "attention_source": source, "slides": metrics["slides"],
                                    **{k: metrics[k] for k in ("mv_at_1", "mv_at_3", "mv_at_5", "mmv_at_5", "map_at_5")}}
    write_json(path, out)
    return out


def _tumour_slides(ws: Workspace) -> tuple[list[str], list[bool]]:
    rows = Catalog.of(ws).query("SELECT slide_id, tumor FROM slide_labels ORDER BY slide_id")
    return [r["slide_id"] for r in rows], [bool(r["tumor"]) for r in rows]
