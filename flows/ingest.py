"""Prefect flow: ingest slides and tile them, one task per slide.

Tasks do the per-slide work (open, probe, hash; tissue mask and grid) and are retried on I/O errors only;
known-bad slides come back as failed records and are not retried. The flow itself is the catalog's single
writer and commits each slide as its task finishes. A table artifact lists slides, tiles and failures.

Run it:  python -m flows.ingest --manifest data/demo/manifest.csv   (or --paths a.svs b.svs --mpp 0.5 --no-tile)
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from histcode.ingest.inspect import inspect_slide
from histcode.ingest.run import IngestReport, finish_slide, plan_ingest
from histcode.ingest.sources import SlideSource, read_manifest, sources_from_paths
from histcode.reports import ingest_summary, tiling_summary
from histcode.store.files import write_json
from histcode.store.catalog import Catalog
from histcode.store.records import FAILED, SlideRecord
from histcode.tiling.run import TilingReport, commit_tiling, plan_tiling
from histcode.tiling.slide import SlideTiling, failed_tiling, tile_slide
from histcode.workspace import Workspace
from flows._entry import run_flow_from_argv


def retry_on_io(task, task_run, state) -> bool:  # noqa: ANN001 -- Prefect's retry_condition_fn signature
    """Retry only transient I/O failures; anything else is a bug or bad input and fails at once."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


@task(name="inspect-slide", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=retry_on_io,
      task_run_name="inspect-{source.slide_id}")
def inspect_task(source: SlideSource, cfg) -> SlideRecord:
    return inspect_slide(source, cfg)


@task(name="tile-slide", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=retry_on_io,
      task_run_name="tile-{slide[slide_id]}", tags=["tiling"])
def tile_task(slide: dict, cfg, spec_id: str, qc_dir: Path) -> SlideTiling:
    return tile_slide(slide, cfg, spec_id, qc_dir)


def _tiling_result(future, slide: dict, spec_id: str) -> SlideTiling:
    """The task's result; an error that survived the retries becomes that slide's failure, not the flow's."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001
        return failed_tiling(slide, spec_id, f"{type(exc).__name__}: {exc}", time.perf_counter())


def _inspect_result(future, source: SlideSource) -> SlideRecord:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001
        return SlideRecord(slide_id=source.slide_id, patient_id=source.patient_id, path=str(source.path),
                           status=FAILED, reason=f"inspection failed after retries: {type(exc).__name__}: {exc}")


def _ingest(sources: list[SlideSource], catalog: Catalog, cfg, cohort: str | None) -> IngestReport:
    plan = plan_ingest(sources, catalog, cfg, cohort)
    futures = [(pending, inspect_task.submit(pending.source, cfg)) for pending in plan.pending]
    for pending, future in futures:
        plan.report.outcomes.append(finish_slide(catalog, pending, _inspect_result(future, pending.source)))
    plan.report.log_summary()
    return plan.report


def _tile(catalog: Catalog, cfg, qc_root: Path) -> TilingReport:
    plan = plan_tiling(catalog, cfg)
    qc_dir = qc_root / plan.spec_id
    futures = [(slide, tile_task.submit(slide, cfg, plan.spec_id, qc_dir)) for slide in plan.todo]
    for slide, future in futures:
        plan.report.outcomes.append(commit_tiling(catalog, _tiling_result(future, slide, plan.spec_id)))
    plan.report.outcomes.sort(key=lambda o: o.slide_id)
    return plan.report


def _artifacts(ingest: IngestReport, tiling: TilingReport | None) -> None:
    tiles = {o.slide_id: o for o in (tiling.outcomes if tiling else [])}
    rows = []
    for o in ingest.outcomes:
        t = tiles.get(o.slide_id)
        rows.append({
            "slide_id": o.slide_id, "ingest": o.action, "status": o.status if t is None else t.status,
            "mpp": o.mpp, "tiles": t.n_tiles if t else 0, "reason": o.reason or (t.reason if t else None) or "",
        })
    create_table_artifact(rows, key="histcode-ingest-slides", description="Slides, tiles and failures of the last ingest run")
    failures = [r for r in rows if r["status"] == "failed"]
    lines = [f"- `{r['slide_id']}`: {r['reason']}" for r in failures] or ["none"]
    create_markdown_artifact("## Failures\n" + "\n".join(lines), key="histcode-ingest-failures")


@flow(name="histcode-ingest", log_prints=False)
def ingest_flow(
    paths: list[str] | None = None,
    manifest: str | None = None,
    mpp: float | None = None,
    tile: bool = True,
    cohort: str | None = None,
    workspace: str | None = None,
) -> dict:
    """Register slides (paths and/or a manifest CSV) in ``cohort`` (default ingest.cohort; a manifest's cohort
    column wins) and, unless ``tile`` is False, tile every healthy slide."""
    logger = get_run_logger()
    ws = Workspace.resolve(workspace).ensure()
    cfg = ws.config()
    sources = read_manifest(Path(manifest), mpp) if manifest else []
    sources += sources_from_paths([Path(p) for p in paths or []], cfg.ingest.extensions, mpp)
    catalog = Catalog.of(ws)
    ingest = _ingest(sources, catalog, cfg.ingest, cohort)
    summary = {"ingest": ingest_summary(ingest)}
    write_json(ws.metrics_dir / "ingest.json", summary["ingest"])
    tiling = None
    if tile:
        tiling = _tile(catalog, cfg.tiling, ws.outputs_dir / "qc")
        summary["tiling"] = tiling_summary(tiling)
        write_json(ws.metrics_dir / "tiling.json", summary["tiling"])
    _artifacts(ingest, tiling)
    logger.info("ingest: %d slides (%d failed); tiles: %s", len(ingest.outcomes), len(ingest.failed),
                summary.get("tiling", {}).get("tiles", "not run"))
    return summary


if __name__ == "__main__":
    run_flow_from_argv(ingest_flow)
