"""`histcode predict`: new slides in, one row of predictions per slide out.

Each slide is ingested and tiled like any other, into an inference cohort of its own (``cohorts.predict``, or
``--cohort``) that pretraining, labels and heads never read, and scored by ``histcode-tumor-head@best``,
``histcode-subtype-head@best``, ``histcode-de-head@best`` and ``histcode-survival-head@best`` (its ``risk``: the
predicted log-risk, ``risk_group`` high or low against the median risk of the slides it was trained on). The heads may come from different encoders: each
head's feature view (its ``view_id`` tag) is checked and the slide is embedded in every view a head needs; a view
the current tiling can no longer produce is refused. A slide that fails at any step gets status ``failed`` and
the reason; the others are predicted. Attention comes from the tumour head registered with the attention
aggregator when there is one. DE calls are ``not_applicable`` for slides the tumour head calls normal (a
tumour-vs-normal fold change means nothing there). Each slide is also placed against the training cohort in the
tumour head's view (``histcode.features.ood``): ``ood_score``, its percentile among the training slides'
leave-one-patient-out scores, and ``in_distribution``; a slide outside says so in ``reason``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from histcode.config import HistcodeConfig
from histcode.features.embed import materialize
from histcode.features.ood import reference_for_view
from histcode.features.registry import load_view
from histcode.heads.apply import LoadedHead, load_head, optional_head
from histcode.heads.data import Bag
from histcode.heads.names import MODEL_NAMES
from histcode.heads.outputs import NOT_APPLICABLE, Output, as_row, class_outputs, de_outputs, survival_outputs
from histcode.heads.smoothing import Smoothing
from histcode.apps.cv_predictions import best_versions
from histcode.apps.heatmaps import render_heatmaps, slide_bag
from histcode.apps.patient_predictions import bagged_outputs, store_patient_predictions
from histcode.ingest.run import ingest_sources
from histcode.ingest.sources import SlideSource
from histcode.store.catalog import INFERENCE, Catalog
from histcode.store.patient_predictions import CURRENT_PATIENT_SQL
from histcode.store.predictions import PREDICT, mark_stale, stale_slides, write_predictions
from histcode.tiling.run import tile_slides
from histcode.tracking import Tracker
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["NOT_APPLICABLE", "Prediction", "predict_slides", "refresh_sources", "registered_heads", "score_slide",
           "slide_outputs"]


@dataclass
class Prediction:
    predictions: pd.DataFrame
    tile_scores: pd.DataFrame = field(default_factory=pd.DataFrame)
    heatmaps: list[Path] = field(default_factory=list)
    views: dict[str, str] = field(default_factory=dict)  # "task@alias v<version>" -> the view id it was applied in
    patients: pd.DataFrame = field(default_factory=pd.DataFrame)  # the predicted slides' patients' pooled rows


def registered_heads(tracker: Tracker) -> dict[str, LoadedHead]:
    """The heads predictions use: tumour@best, subtype@best, DE@best and survival@best where registered, and the tumour head
    whose attention is drawn (@attention, else @best)."""
    tumor = load_head(tracker, "tumor", "best")
    heads = {"tumor": tumor, "subtype": optional_head(tracker, "subtype"), "de": optional_head(tracker, "de"),
             "survival": optional_head(tracker, "survival"),
             "attention": optional_head(tracker, "tumor", "attention") or tumor}
    return {k: h for k, h in heads.items() if h is not None}


def predict_slides(ws: Workspace, cfg: HistcodeConfig, sources: list[SlideSource], heatmap_dir: Path | None = None,
                   progress: bool = True, cohort: str | None = None,
                   slide_weights: dict[str, Path] | None = None) -> Prediction:
    """New slides go into the inference cohort ``cohort`` (default cohorts.predict), which training never
    reads; a slide id that is already registered in another cohort with the same pixels is predicted where it
    is (its ``cohort`` column says so), and refused if it names other pixels. ``slide_weights``: slide encoder
    name -> its weight file, for heads trained on a slide encoder's view (the slides are embedded in its tile
    view, then encoded by it; the weights must be those the view was made with)."""
    catalog, tracker = Catalog.of(ws), Tracker(ws)
    heads = registered_heads(tracker)
    views = {f"{h.task}@{'attention' if key == 'attention' else 'best'} v{h.version}": h.view_id for key, h in heads.items()}
    for name, view_id in views.items():
        log.info("%s is applied in view %s", name, view_id)
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
    by_view = {h.view_id: h for h in heads.values()}
    views_of = {view_id: load_view(catalog, view_id, cfg.features.attribute_columns) for view_id in by_view}
    for view_id, head in by_view.items():
        if not healthy:
            break
        view = views_of[view_id]
        tile_view = load_view(catalog, view.source_view_id, cfg.features.attribute_columns) if view.slide_level else view
        for o in _embed_tiles(ws, cfg, tile_view, head, list(healthy), progress):
            if o.slide_id in healthy:
                fail(o.slide_id, f"embedding in view {tile_view.view_id}: {o.reason}")
        if view.slide_level and healthy:
            for o in _encode_slides(ws, cfg, view, head, list(healthy), slide_weights or {}):
                if o.slide_id in healthy:
                    fail(o.slide_id, f"slide encoding into view {view_id}: {o.reason}")
    ood = _ood_reference(ws, catalog, cfg, heads["tumor"]) if healthy else None
    tiles, pictures, stored = [], [], []
    for sid, row in healthy.items():
        try:
            bags = {view_id: slide_bag(ws, head, sid) for view_id, head in by_view.items()}
            scored, slide_tiles, outputs = score_slide(bags, heads, Smoothing.of(cfg.heads))
            placed = ood.assess(bags[heads["tumor"].view_id].features) if ood is not None else {}
            scored.update(placed)
        except Exception as exc:  # noqa: BLE001 -- one slide's failure must not lose the others' predictions
            log.warning("scoring %s failed: %s", sid, exc)
            row.update(status="failed", reason=f"scoring: {type(exc).__name__}: {exc}")
            continue
        row.update(scored)
        stored += prediction_rows(sid, outputs, heads, placed)
        if ood is not None and not scored["in_distribution"]:
            row["reason"] = (f"out of the training distribution: tiles lie {scored['ood_score']:.3f} from the training "
                             f"cohort's (threshold {ood.threshold:.3f}); treat these predictions with caution")
            log.warning("%s: %s", sid, row["reason"])
        tiles += slide_tiles
        if heatmap_dir is not None and bags[heads["attention"].view_id].has_tiles:
            try:
                pictures += render_heatmaps(ws, sid, heatmap_dir, heads=(heads["attention"], heads.get("de")),
                                            bags=bags, smoothing=Smoothing.of(cfg.heads)).pictures
            except Exception as exc:  # noqa: BLE001 -- the predictions stand; the picture is what failed
                log.warning("heatmap of %s failed: %s", sid, exc)
                row["reason"] = "; ".join(filter(None, [row.get("reason"),
                                                        f"predicted; heatmap failed: {type(exc).__name__}: {exc}"]))
    write_predictions(catalog, pd.DataFrame(stored), current_versions(heads))
    patients = _patient_rows(ws, catalog, heads, [sid for sid, r in healthy.items() if r["status"] == "ok"],
                             cfg.predict.patient_pooling)
    frame = pd.DataFrame(rows)
    for col in ("p_tumor", "p_luad", "p_lusc", "ood_score", "ood_percentile", "in_distribution"):
        if col not in frame:
            frame[col] = np.nan
    lead = ["slide_id", "cohort", "status", "reason", "p_tumor", "p_luad", "p_lusc", "in_distribution", "ood_score",
            "ood_percentile"]
    frame = frame[lead + [c for c in frame.columns if c not in lead]]
    columns = ["slide_id", "x", "y", "size", "attention", "attention_raw"]
    return Prediction(frame, pd.DataFrame(tiles, columns=columns), pictures, views, patients)


def _patient_rows(ws: Workspace, catalog: Catalog, heads: dict[str, LoadedHead], slide_ids: list[str],
                  pooling: str) -> pd.DataFrame:
    """Pool and store the patient-level predictions of the predicted slides' patients (with their other
    predicted slides, ``histcode.apps.patient_predictions``); their current rows."""
    if not slide_ids:
        return pd.DataFrame()
    marks = ",".join("?" * len(slide_ids))
    patients = sorted({r["patient_id"] or r["slide_id"] for r in catalog.query(
        f"SELECT slide_id, patient_id FROM slides WHERE slide_id IN ({marks})", slide_ids)})
    bagged = bagged_outputs(ws, catalog, heads, patients) if pooling == "bag" else None
    store_patient_predictions(catalog, PREDICT, pooling, current_versions(heads), patients, bagged)
    marks = ",".join("?" * len(patients))
    current = CURRENT_PATIENT_SQL.format(table="patient_predictions")
    return pd.DataFrame(catalog.query(f"SELECT * FROM ({current}) WHERE source = ? AND patient_id IN ({marks}) "
                                      "ORDER BY patient_id, task, output", [PREDICT, *patients]))


def _embed_tiles(ws: Workspace, cfg: HistcodeConfig, view, head: LoadedHead, slide_ids: list[str], progress: bool):
    """Embed the slides in the tile view ``view`` (a head's own, or the tile view its slide encoder read); the
    failed outcomes. A view whose encoder HistCode cannot run (imported features) or that the current tiling no
    longer produces is refused."""
    if (view.method or "").startswith("imported:"):
        raise RuntimeError(f"{head.task} head v{head.version} reads view {view.view_id}, features imported from "
                           f"{view.model_name}: HistCode cannot embed new slides with that encoder; extract them with "
                           "the same tool and `histcode import` them, or train the heads on a view HistCode embeds")
    report = materialize(ws, cfg, encoder=view.encoder_uri.removeprefix("models:/"), slide_ids=slide_ids,
                         progress=progress)
    if report.view.view_id != view.view_id:
        raise RuntimeError(f"{head.task} head v{head.version} was trained on view {head.view_id}, but its encoder "
                           f"{view.encoder_uri} now embeds into {report.view.view_id} instead of {view.view_id}: the "
                           "tiling spec changed since `histcode heads`; train the heads again on the current tiling")
    return report.failed


def _encode_slides(ws: Workspace, cfg: HistcodeConfig, view, head: LoadedHead, slide_ids: list[str],
                   slide_weights: dict[str, Path]):
    """Encode the slides into the slide encoder's view ``view`` with the weights given for it; the failed
    outcomes. Weights that are not those the view was made with (another hash, another view) are refused."""
    from histcode.features.registry import SLIDE_METHOD_PREFIX
    from histcode.features.slide_embed import embed_slides
    from histcode.ssl.slide_encoders import slide_encoder_spec
    from histcode.ssl.weights import locate_weights
    from histcode.wsi.files import file_sha256

    encoder = view.model_name.removeprefix(SLIDE_METHOD_PREFIX)
    weights = slide_weights.get(encoder)
    if weights is None:
        raise RuntimeError(f"{head.task} head v{head.version} reads view {view.view_id}, made by the slide encoder "
                           f"{encoder}: give its weights, `histcode predict ... --slide-weights {encoder}=PATH`")
    path = locate_weights(slide_encoder_spec(encoder), Path(weights))
    if not view.model_version.endswith("." + file_sha256(path, 1 << 24)[:12]):  # slide_view_of: <tile view>.<sha[:12]>
        raise RuntimeError(f"the {encoder} weights at {path} are not those view {view.view_id} was made with; give "
                           "the weights `histcode encoders embed-slides` used for it")
    return embed_slides(ws, cfg, encoder, path, view.source_view_id, slide_ids).failed


def refresh_sources(catalog: Catalog, tracker: Tracker, slide_ids: list[str] | None = None) -> list[SlideSource]:
    """The registered slides ``histcode predict --refresh`` recomputes (``store.predictions.stale_slides``, once
    the stored rows are marked against the versions ``@best`` names now, wherever the alias was moved; with
    ``slide_ids``, those slides whatever their rows), as sources that re-ingest them where they are: same file,
    cohort and, where a user gave it, scale."""
    mark_stale(catalog, best_versions(tracker, MODEL_NAMES))
    if slide_ids:
        unknown = [s for s in slide_ids if catalog.get_slide(s) is None]
        if unknown:
            raise LookupError(f"no slide {unknown[0]!r} in the catalog" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    ids = list(slide_ids) if slide_ids else stale_slides(catalog)
    sources = []
    for sid in ids:
        row = catalog.get_slide(sid)
        sources.append(SlideSource(Path(row["path"]), sid, row["patient_id"] or sid,
                                   row["mpp_x"] if row["mpp_source"] == "user" else None, cohort=row["cohort"]))
    return sources


def _ood_reference(ws: Workspace, catalog: Catalog, cfg: HistcodeConfig, tumor: LoadedHead):
    """The training cohort's reference in the tumour head's view, or None when the check is off or impossible
    (logged: predictions go on without it)."""
    if not cfg.predict.ood.enabled:
        return None
    try:
        view = load_view(catalog, tumor.view_id, cfg.features.attribute_columns)
        return reference_for_view(ws, catalog, view, catalog.training_cohorts(cfg.cohorts.train), cfg.predict.ood)
    except (ValueError, LookupError) as exc:
        log.warning("no out-of-distribution check: %s", exc)
        return None


def slide_outputs(bags: dict[str, Bag], heads: dict[str, LoadedHead]) -> dict[str, list[Output]]:
    """Each registered head's outputs on one slide (``histcode.heads.outputs``), each head reading the slide's bag in
    its own view; task -> outputs."""
    tumor = heads["tumor"]
    p, _ = tumor(bags[tumor.view_id].features)
    out = {"tumor": class_outputs("tumor", tumor.classes, p)}
    p_tumor = out["tumor"][0].value
    if "subtype" in heads:
        subtype = heads["subtype"]
        out["subtype"] = class_outputs("subtype", subtype.classes, subtype(bags[subtype.view_id].features)[0])
    if "de" in heads:
        de = heads["de"]
        out["de"] = de_outputs(de.genes, de.classes, de.classified_genes, de(bags[de.view_id].features)[0], p_tumor)
    if "survival" in heads:  # the log-risk, high/low against the training median (meant for tumour slides)
        survival = heads["survival"]
        out["survival"] = survival_outputs(survival(bags[survival.view_id].features)[0])
    return out


def score_slide(bags: dict[str, Bag], heads: dict[str, LoadedHead],
                smoothing: Smoothing = Smoothing()) -> tuple[dict, list[dict], dict[str, list[Output]]]:
    """One slide's row (p_tumor, subtype probabilities, DE calls), its tiles' attention (the map smoothed over the
    tile grid by ``smoothing``, ``histcode.heads.smoothing``, what heatmaps draw, and the head's raw weights), and
    the outputs per task that the row flattens."""
    outputs = slide_outputs(bags, heads)
    row = as_row([o for task in outputs.values() for o in task])
    if "survival" in outputs:
        row["risk_group"] = outputs["survival"][0].call
    attention_head = heads["attention"]
    bag = bags[attention_head.view_id]
    if not bag.has_tiles:  # a slide encoder's view: one vector per slide, no tile attention
        return row, [], outputs
    _, raw = attention_head(bag.features)
    attention = smoothing.apply(raw, bag.xy, bag.size)
    tiles = [{"slide_id": bag.slide_id, "x": int(x), "y": int(y), "size": bag.size, "attention": float(a),
              "attention_raw": float(r)} for (x, y), a, r in zip(bag.xy, attention, raw)]
    return row, tiles, outputs


def prediction_rows(slide_id: str, outputs: dict[str, list[Output]], heads: dict[str, LoadedHead],
                    ood: dict | None = None) -> list[dict]:
    """One slide's outputs as rows of the catalog's ``predictions`` table (``histcode.store.predictions``)."""
    ood = ood or {}
    rows = []
    for task, task_outputs in outputs.items():
        head = heads[task]
        for o in task_outputs:
            rows.append({"slide_id": slide_id, "task": task, "model": MODEL_NAMES[task], "version": int(head.version),
                         "aggregator": head.aggregator, "view_id": head.view_id, "source": PREDICT, "output": o.name,
                         "value": o.value, "call": o.call, "in_distribution": ood.get("in_distribution"),
                         "ood_score": ood.get("ood_score"), "ood_percentile": ood.get("ood_percentile")})
    return rows


def current_versions(heads: dict[str, LoadedHead]) -> dict[str, int]:
    """task -> the version its ``@best`` names (what older rows are stale against)."""
    return {task: int(h.version) for task, h in heads.items() if task != "attention"}
