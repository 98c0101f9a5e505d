"""`histcode predict`: new slides in, one row of predictions per slide out.

Each slide is ingested and tiled like any other, into an inference cohort of its own (``cohorts.predict``, or
``--cohort``) that pretraining, labels and heads never read, embedded with the encoder of the registered heads'
feature view, and scored by ``histcode-tumor-head@best``, ``histcode-subtype-head@best`` and
``histcode-de-head@best``. A slide that fails at any step gets status ``failed`` and the reason; the others are
predicted. Attention comes from the tumour head registered with the attention aggregator when there is one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from histcode.config import HistcodeConfig
from histcode.features.embed import materialize
from histcode.heads.apply import load_head, optional_head
from histcode.heads.data import Bag
from histcode.apps.heatmaps import render_heatmaps, slide_bag
from histcode.ingest.run import ingest_sources
from histcode.ingest.sources import SlideSource
from histcode.store.catalog import INFERENCE, Catalog
from histcode.tiling.run import tile_slides
from histcode.tracking import Tracker
from histcode.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    predictions: pd.DataFrame
    tile_scores: pd.DataFrame = field(default_factory=pd.DataFrame)
    heatmaps: list[Path] = field(default_factory=list)


def predict_slides(ws: Workspace, cfg: HistcodeConfig, sources: list[SlideSource], heatmap_dir: Path | None = None,
                   progress: bool = True, cohort: str | None = None) -> Prediction:
    """New slides go into the inference cohort ``cohort`` (default cohorts.predict), which training never
    reads; a slide id that is already registered in another cohort with the same pixels is predicted where it
    is (its ``cohort`` column says so), and refused if it names other pixels."""
    catalog, tracker = Catalog.of(ws), Tracker(ws)
    tumor = load_head(tracker, "tumor", "best")
    subtype = optional_head(tracker, "subtype")
    de = optional_head(tracker, "de")
    attention_head = optional_head(tracker, "tumor", "attention") or tumor
    ingested = ingest_sources(sources, catalog, cfg.ingest, progress=progress, cohort=cohort or cfg.cohorts.predict,
                              role=INFERENCE, keep_other_cohorts=True)
    # one row per source, in order; a refused duplicate keeps its own failed row
    rows = [{"slide_id": o.slide_id, "cohort": o.cohort, "status": o.status, "reason": o.reason} for o in ingested.outcomes]
    healthy = {r["slide_id"]: r for r in rows if r["status"] == "ok"}

    def fail(slide_id: str, reason: str) -> None:
        healthy.pop(slide_id).update(status="failed", reason=reason)

    if healthy:
        for o in tile_slides(catalog, cfg.tiling, ws.outputs_dir / "qc", slide_ids=list(healthy), progress=progress).outcomes:
            if o.status != "ok" and o.slide_id in healthy:
                fail(o.slide_id, f"tiling: {o.reason}")
    if healthy:
        encoder = tumor.encoder_uri.removeprefix("models:/")
        report = materialize(ws, cfg, encoder=encoder, slide_ids=list(healthy), progress=progress)
        if report.view.view_id != tumor.view_id:
            raise RuntimeError(f"embedding produced view {report.view.view_id}, but the heads were trained on "
                               f"{tumor.view_id}: the tiling spec or encoder changed since `histcode heads`")
        for o in report.failed:
            if o.slide_id in healthy:
                fail(o.slide_id, f"embedding: {o.reason}")
    tiles, pictures = [], []
    for sid, row in healthy.items():
        try:
            bag = slide_bag(ws, tumor, sid)
            scored, slide_tiles = _score_slide(bag, tumor, subtype, de, attention_head)
        except Exception as exc:  # noqa: BLE001 -- one slide's failure must not lose the others' predictions
            log.warning("scoring %s failed: %s", sid, exc)
            row.update(status="failed", reason=f"scoring: {type(exc).__name__}: {exc}")
            continue
        row.update(scored)
        tiles += slide_tiles
        if heatmap_dir is not None:
            try:
                pictures += render_heatmaps(ws, sid, heatmap_dir, heads=(attention_head, de),
                                           bag=bag if attention_head.view_id == tumor.view_id else None).pictures
            except Exception as exc:  # noqa: BLE001 -- the predictions stand; the picture is what failed
                log.warning("heatmap of %s failed: %s", sid, exc)
                row["reason"] = f"predicted; heatmap failed: {type(exc).__name__}: {exc}"
    frame = pd.DataFrame(rows)
    for col in ("p_tumor", "p_luad", "p_lusc"):
        if col not in frame:
            frame[col] = np.nan
    lead = ["slide_id", "cohort", "status", "reason", "p_tumor", "p_luad", "p_lusc"]
    frame = frame[lead + [c for c in frame.columns if c not in lead]]
    return Prediction(frame, pd.DataFrame(tiles, columns=["slide_id", "x", "y", "size", "attention"]), pictures)


def _score_slide(bag: Bag, tumor, subtype, de, attention_head) -> tuple[dict, list[dict]]:
    sid = bag.slide_id
    p, _ = tumor(bag.features)
    row = {"p_tumor": float(p[list(tumor.classes).index("tumor")])}
    if subtype is not None:
        ps, _ = subtype(bag.features)
        row.update({f"p_{c.lower()}": float(v) for c, v in zip(subtype.classes, ps)})
    if de is not None:
        out, _ = de(bag.features)
        for g, gene in enumerate(de.genes):
            probs = out[g, 1:]
            called = gene in de.classified_genes and np.isfinite(probs).all()
            row[f"de_{gene}"] = de.classes[int(np.argmax(probs))] if called else "not_classified"
    _, attention = attention_head(bag.features)
    tiles = [{"slide_id": sid, "x": int(x), "y": int(y), "size": bag.size, "attention": float(a)}
             for (x, y), a in zip(bag.xy, attention)]
    return row, tiles
