"""Tile every registered slide that is not yet tiled under the current spec.

Per-slide idempotent: a slide whose ledger row for this spec is 'ok' with the slide's current content hash is
skipped without being opened. A different spec gets its own spec_id, so its tiles are added beside the old
ones. Slides are tiled in worker processes (spawned, each with its own OpenSlide handle); this process is the
only catalog writer and commits each slide's tiles in one transaction.

A slide whose input is bad (unreadable, no tissue, smaller than a tile) is recorded failed with the reason, and
a rerun skips it (``--retry-failed`` tries it again). A fault of the machine (a full disk while writing its QC
pictures or committing, a failing device, no file handles or memory left) is not the slide's: nothing of it is
recorded, the run stops with a ``MachineFault`` saying what happened and what was kept, and a plain rerun tiles
it and the slides after it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from histcode.config import TilingConfig
from histcode.errors import MachineFault, is_machine_fault, machine_errno, machine_fault, machine_faults_told
from histcode.runtime import failpoint
from histcode.store.catalog import Catalog, SlideChangedError
from histcode.store.records import FAILED, OK
from histcode.tiling.slide import SlideTiling, failed_tiling, tile_slide
from histcode.tiling.spec import spec_id_of, spec_payload

log = logging.getLogger(__name__)

TILED, SKIPPED = "tiled", "skipped"


@dataclass
class TileOutcome:
    slide_id: str
    action: str  # tiled | skipped | failed
    status: str
    n_tiles: int
    n_candidates: int | None = None
    reason: str | None = None
    seconds: float | None = None


@dataclass
class TilingReport:
    spec_id: str
    outcomes: list[TileOutcome] = field(default_factory=list)
    not_ingested: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[TileOutcome]:
        return [o for o in self.outcomes if o.status == FAILED]

    @property
    def n_tiles(self) -> int:
        return sum(o.n_tiles for o in self.outcomes)

    def count(self, action: str) -> int:
        return sum(o.action == action for o in self.outcomes)

    def as_rows(self) -> list[dict]:
        return [o.__dict__.copy() for o in self.outcomes]


def needs_tiling(slide: dict, ledger: dict | None, retry_failed: bool = False) -> bool:
    """A slide is tiled again only if it has no ledger row for this spec, its content changed since, or its
    last attempt failed and ``retry_failed`` is set."""
    if ledger is None or ledger["content_hash"] != slide["content_hash"]:
        return True
    if ledger["status"] == FAILED:
        return retry_failed
    return ledger["status"] != OK


def safe_tile_slide(slide: dict, cfg: TilingConfig, spec_id: str, qc_dir: Path) -> SlideTiling:
    """tile_slide with unexpected errors of the input turned into a failed row, so one slide never stops the
    batch; a fault of the machine is raised as a MachineFault naming the slide (it was not attempted)."""
    t0 = time.perf_counter()
    doing = f"tiling slide {slide['slide_id']}"
    try:
        failpoint("tiling.slide")
        result = tile_slide(slide, cfg, spec_id, qc_dir)
    except Exception as exc:  # noqa: BLE001 -- recorded with its traceback in the log
        fault = machine_fault(exc, doing)
        if fault is not None:
            raise fault from exc
        log.error("%s: tiling raised\n%s", slide["slide_id"], traceback.format_exc())
        return failed_tiling(slide, spec_id, f"unexpected error: {type(exc).__name__}: {exc}", t0)
    reason = result.record.reason
    if result.record.status == FAILED and machine_errno(reason) is not None:  # e.g. a read that met a failing disk
        raise MachineFault(machine_errno(reason), doing, detail=reason[:200])
    return result


def _run(slides: list[dict], cfg: TilingConfig, spec_id: str, qc_dir: Path, workers: int) -> Iterator[SlideTiling]:
    if workers <= 1 or len(slides) <= 1:
        for slide in slides:
            yield safe_tile_slide(slide, cfg, spec_id, qc_dir)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    try:
        futures = {pool.submit(safe_tile_slide, s, cfg, spec_id, qc_dir): s for s in slides}
        for fut in as_completed(futures):
            try:
                yield fut.result()
            except MachineFault:
                raise
            except Exception as exc:  # noqa: BLE001 -- a worker died (killed, out of memory): that slide fails
                if is_machine_fault(exc):
                    raise machine_fault(exc, f"tiling slide {futures[fut]['slide_id']}") from exc
                reason = f"worker process failed: {type(exc).__name__}: {exc}"
                yield failed_tiling(futures[fut], spec_id, reason, time.perf_counter())
    finally:  # an error in the caller must not wait for every queued slide
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class TilingPlan:
    spec_id: str
    todo: list[dict]  # slide rows to tile
    report: TilingReport  # already holds the skipped and unknown slides


def plan_tiling(
    catalog: Catalog,
    cfg: TilingConfig,
    slide_ids: list[str] | None = None,
    force: bool = False,
    retry_failed: bool = False,
) -> TilingPlan:
    """Register the spec and decide which healthy slides need tiling; the rest are reported as skipped.
    ``force`` re-tiles everything; ``retry_failed`` retries slides whose last attempt under this spec failed
    (by default a rerun does no work for them either)."""
    spec_id = spec_id_of(cfg)
    catalog.put_spec(spec_id, spec_payload(cfg))
    report = TilingReport(spec_id=spec_id)
    wanted = set(slide_ids) if slide_ids else None
    all_slides = [s for s in catalog.slides() if wanted is None or s["slide_id"] in wanted]
    if wanted:
        for sid in sorted(wanted - {s["slide_id"] for s in all_slides}):
            report.outcomes.append(TileOutcome(sid, FAILED, FAILED, 0, reason="not in the catalog; run `histcode ingest`"))
    report.not_ingested = [s["slide_id"] for s in all_slides if s["status"] != OK]
    ledger = {row["slide_id"]: row for row in catalog.tilings(spec_id)}
    todo = []
    for slide in (s for s in all_slides if s["status"] == OK):
        row = ledger.get(slide["slide_id"])
        if force or needs_tiling(slide, row, retry_failed):
            todo.append(slide)
        else:
            report.outcomes.append(
                TileOutcome(slide["slide_id"], SKIPPED, row["status"], row["n_tiles"], row["n_candidates"], row["reason"])
            )
    log.info("tiling spec %s: %d slides to tile, %d already done, %d not ingested", spec_id, len(todo),
             report.count(SKIPPED), len(report.not_ingested))
    return TilingPlan(spec_id, todo, report)


def commit_tiling(catalog: Catalog, result: SlideTiling) -> TileOutcome:
    """Write one slide's tiles and ledger row (one transaction) and say what happened. A slide re-ingested
    while it was being tiled is reported, not written (its new content gets tiled by the next run)."""
    rec = result.record
    try:
        catalog.put_tiling(rec, result.tiles)
    except SlideChangedError as exc:
        log.warning("%s", exc)
        return TileOutcome(rec.slide_id, FAILED, FAILED, 0, rec.n_candidates, str(exc), rec.seconds)
    if rec.status == FAILED:
        log.warning("%s: tiling failed: %s", rec.slide_id, rec.reason)
    return TileOutcome(rec.slide_id, TILED if rec.status == OK else FAILED, rec.status, rec.n_tiles, rec.n_candidates,
                       rec.reason, rec.seconds)


def tile_slides(
    catalog: Catalog,
    cfg: TilingConfig,
    qc_root: Path,
    slide_ids: list[str] | None = None,
    force: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
) -> TilingReport:
    """Tile the catalog's healthy slides (optionally only ``slide_ids``) under ``cfg`` in ``cfg.workers``
    processes; QC pictures go to ``qc_root / spec_id``."""
    plan = plan_tiling(catalog, cfg, slide_ids, force, retry_failed)
    report = plan.report
    bar = tqdm(total=len(plan.todo), desc="tile", unit="slide", disable=not progress)
    done = []

    def kept() -> str:
        return (f"nothing of that slide was committed; the {len(done)} slides committed before it are kept and "
                f"{len(plan.todo) - len(done)} (it included) were not attempted: a plain rerun tiles them")

    try:
        with machine_faults_told("tiling", kept):
            for result in _run(plan.todo, cfg, plan.spec_id, qc_root / plan.spec_id, cfg.workers):
                report.outcomes.append(commit_tiling(catalog, result))
                done.append(result.record.slide_id)
                failpoint("tiling.committed")
                bar.set_postfix(tiles=report.n_tiles, refresh=False)
                bar.update()
    finally:
        bar.close()
    report.outcomes.sort(key=lambda o: o.slide_id)
    return report
