"""Materialise a feature view: embed every tile of every finished slide with a registered encoder, write
tile and slide vectors to LanceDB, record each slide in the catalog's ledger.

Tiles are embedded in batches that never span two slides (``SlideBatches``), so a slide's vectors do not depend
on which other slides share its run, its shard or its worker: one process or a fan-out over workers gives the
same rows. Reader processes (spawned: Lance is not fork-safe) hide slide reads behind the model where cores
allow; on CUDA, batches come through pinned memory with non-blocking copies, in channels-last layout under
autocast (``features.amp``, bf16 where the device supports it, else fp16), and leave the device as fp32.

In one process (``materialize``), finished slides are written ``commit_every_slides`` at a time, one Lance
commit per table per batch of slides, never per tile. Fanned out (``plan_view`` here, then
``histcode.features.shards``), each worker stages its slides' vectors as Arrow IPC files in a folder of its own
and touches neither Lance nor the catalog; the coordinator commits the staged slides through the same writer
(``ViewWriter``) and alone writes the ledger. The Lance commit comes first
and the ledger row second: a process killed in between leaves rows that the rerun rewrites in place (upserts on
the id), so a kill at any point followed by a rerun ends with exactly one row per tile. The ledger's commit also
records the tables' versions, which SQL and search read (``histcode.store.agreement``): what a step wrote before
its ledger commit failed stays unseen. A slide whose tiles cannot be read is marked failed with the reason; the
others go on. A fault of the machine (a full disk, a failing device, no file handles or memory left) is no
slide's: the command stops with a ``MachineFault`` saying so, what was kept, and that a plain rerun carries on.

Before any work the view's tables are checked against the ledger (``plan_view``): a table that is missing, or
holds fewer rows than the ledger records, has the slides it lost embedded again and the disagreement reported;
``recheck`` compares rows per slide even when the totals agree.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from histcode.config import FeaturesConfig, HistcodeConfig
from histcode.errors import NOT_ATTEMPTED, MachineFault, machine_errno, machine_faults_told
from histcode.features.registry import (
    FeatureView,
    describe_view,
    done_slides,
    record_materializations,
    record_table_versions,
    register_view,
    resolve_encoder,
    set_view_status,
)
from histcode.features.upkeep import maintain_tables
from histcode.ssl.dataset import TileDataset, dataset_from_catalog
from histcode.ssl.stain_norm import normalise_dataset, parse as parse_stain_norm

from histcode.store.agreement import catalog_state, check_table, forget_versions
from histcode.store.catalog import Catalog
from histcode.store.records import utcnow
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, connect, open_table, table_names, to_batch, upsert_slides
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
    workers: int = 1  # processes the slides were embedded in
    repairs: list[str] = field(default_factory=list)  # disagreements of the tables with the ledger, and what was done

    @property
    def failed(self) -> list[EmbedOutcome]:
        return [o for o in self.outcomes if o.action == "failed"]

    def count(self, action: str) -> int:
        return sum(o.action == action for o in self.outcomes)

    @property
    def tiles_per_s(self) -> float:
        return self.tiles_embedded / self.seconds if self.seconds else 0.0


@dataclass
class SlideVectors:
    """One slide's embedded tiles, in the dataset's tile order, or the error that stopped them."""

    slide_id: str
    tile_ids: list[str]
    x: np.ndarray
    y: np.ndarray
    size: int
    vectors: np.ndarray | None  # (tiles, dim) float32; None when ``error``
    error: str | None = None


class SlideBatches(Sampler[list[int]]):
    """Batches of at most ``batch_size`` tiles of one slide each, slide after slide in dataset order (the
    dataset's tiles are grouped by slide)."""

    def __init__(self, slide_of: np.ndarray, batch_size: int) -> None:
        self.bounds = np.flatnonzero(np.diff(slide_of, prepend=-1, append=-1))  # slide starts, then the end
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in zip(self.bounds[:-1], self.bounds[1:]):
            for first in range(int(start), int(stop), self.batch_size):
                yield list(range(first, min(first + self.batch_size, int(stop))))

    def __len__(self) -> int:
        sizes = np.diff(self.bounds)
        return int(np.sum(-(-sizes // self.batch_size)))


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


@dataclass
class ViewPlan:
    """What a materialisation will do: the view (registered), its slides (catalog rows) and those to embed."""

    ws: Workspace
    cfg: HistcodeConfig
    view: FeatureView
    slides: dict[str, dict]
    todo: list[str]
    report: EmbedReport

    def dataset(self, slide_ids: list[str] | None = None) -> TileDataset:
        """The tiles of ``slide_ids`` (default: every slide to do), grouped by slide, read at the view's size
        (and, for a foundation encoder, the view's microns per pixel: see ``FeatureView.tile_field``)."""
        field = self.view.tile_field(self.cfg.tiling.tile_px, self.cfg.tiling.target_mpp)
        return dataset_from_catalog(Catalog.of(self.ws), self.view.spec_id, self.view.image_px,
                                    slide_ids=self.todo if slide_ids is None else slide_ids, field=field)

    def tables(self) -> dict:
        """The view's tables, opened or made; a table made anew forgets the version recorded for its name."""
        db = connect(self.ws.lancedb_uri)
        specs = {kind: self.view.table(kind) for kind in (TILE_KIND, SLIDE_KIND)}
        new = [spec.name for spec in specs.values() if spec.name not in set(table_names(db))]
        tables = {kind: open_table(db, spec) for kind, spec in specs.items()}
        if new:
            with Catalog.of(self.ws).transaction() as con:
                forget_versions(con, new)
        return tables


def check_against_ledger(ws: Workspace, view: FeatureView, full: bool = False) -> list:
    """The view's disagreements with the ledger (``histcode.store.agreement.Disagreement``), its tables read at
    their latest version (the one a writer writes on)."""
    ledger, pinned = catalog_state(Catalog.of(ws))
    ledger = ledger.get(view.view_id, {})
    if not ledger:
        return []
    db = connect(ws.lancedb_uri)
    found = []
    for kind in (TILE_KIND, SLIDE_KIND):
        name = view.table(kind).name
        dataset, problem = check_table(db, view.view_id, kind, name, ledger, full=full)
        if problem is None and dataset is not None and pinned.get(name, 0) > dataset.version:
            _, problem = check_table(db, view.view_id, kind, name, ledger, full=True)  # older than the record
        if problem is not None:
            found.append(problem)
    return found


def plan_view(ws: Workspace, cfg: HistcodeConfig, encoder: str | None = None,
              slide_ids: list[str] | None = None, recheck: bool = False) -> ViewPlan:
    """Register the view of ``encoder`` (default features.encoder) and find the slides it lacks: tiled under the
    current spec, not yet materialised with their current content, or materialised in the ledger but missing
    from the tables (``check_against_ledger``; ``recheck``: rows per slide compared too)."""
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
    for problem in check_against_ledger(ws, view, full=recheck):
        lost = [sid for sid in problem.slides if sid in done]
        again = [sid for sid in lost if sid in slides]
        note = f"{problem}: {'embedding ' + str(len(again)) + ' slides again' if again else 'none of them to embed here'}"
        if len(again) < len(lost):
            note += f" ({len(lost) - len(again)} are not tiled under spec {spec_id} now, or not asked for)"
        log.warning("%s", note)
        report.repairs.append(note)
        for sid in again:
            done.pop(sid, None)
    todo = [sid for sid, s in slides.items() if done.get(sid) != s["content_hash"]]
    report.outcomes += [EmbedOutcome(sid, "skipped") for sid in slides if sid not in todo]
    log.info("view %s (%s, spec %s): %d slides to embed, %d done", view.view_id, view.encoder_uri, spec_id,
             len(todo), len(slides) - len(todo))
    return ViewPlan(ws, cfg, view, slides, todo, report)


def finish_view(plan: ViewPlan, tables: dict, changed: bool, tag: str | None) -> EmbedReport:
    report = plan.report
    catalog = Catalog.of(plan.ws)
    set_view_status(catalog, plan.view.view_id, "ok" if not report.failed else "partial")
    with machine_faults_told(f"compacting and indexing the tables of view {plan.view.view_id}",
                             "every slide embedded is committed; the tables are kept as they were"):
        report.maintenance = maintain_tables(tables, plan.cfg.features, changed=changed, tag=tag)
    record_table_versions(catalog, plan.view.view_id, tables)  # compacted and indexed: the same rows, read faster
    report.versions = {kind: t.version for kind, t in tables.items()}
    report.outcomes.sort(key=lambda o: o.slide_id)
    return report


def materialize(ws: Workspace, cfg: HistcodeConfig, encoder: str | None = None, slide_ids: list[str] | None = None,
                tag: str | None = None, progress: bool = True, recheck: bool = False) -> EmbedReport:
    """Embed, in this process, every slide the view lacks; write and record them as they finish. ``recheck``:
    compare the tables with the ledger slide by slide first (``plan_view``)."""
    plan = plan_view(ws, cfg, encoder, slide_ids, recheck)
    tables = plan.tables()
    if plan.todo:
        writer = ViewWriter(plan, tables)
        clock: dict[str, float] = {}  # throughput counts reading, embedding and writing, not loading the model
        try:
            with machine_faults_told(f"embedding the tiles of view {plan.view.view_id}", writer.kept):
                for slide in embed_slides(Tracker(ws), plan.view, cfg.features, plan.dataset(), progress,
                                          on_start=lambda: clock.setdefault("start", time.perf_counter())):
                    writer.add(slide)
                writer.flush()
        finally:
            plan.report.seconds = time.perf_counter() - clock.get("start", time.perf_counter())
    return finish_view(plan, tables, changed=bool(plan.todo), tag=tag)


def embed_slides(tracker: Tracker, view: FeatureView, fcfg: FeaturesConfig, dataset: TileDataset,
                 progress: bool = True, on_start: Callable[[], None] | None = None) -> Iterator[SlideVectors]:
    """Each slide of ``dataset`` embedded with the view's encoder (stain-normalised as the encoder was
    trained), yielded as soon as its last batch is done. ``on_start`` is called once the model is loaded."""
    device = resolve_device(fcfg.device)
    model = tracker.load_model(view.encoder_uri).to(device)  # an exported graph: already in inference mode
    tags = resolve_encoder(tracker, view.encoder_uri)[2]  # the encoder's version tags say how it reads tiles
    normalise_dataset(dataset, parse_stain_norm(tags.get("stain_norm")))
    slide_of = dataset.tiles[:, 0]
    workers = resolve_workers(fcfg.num_workers, device)
    cuda = device.type == "cuda"
    # Lance handles may be open in this process, and Lance is not fork-safe: reader processes are spawned
    batches = SlideBatches(slide_of, fcfg.batch_size)
    loader = DataLoader(_ReadOrReport(dataset), batch_sampler=batches,
                        num_workers=workers, multiprocessing_context="spawn" if workers else None,
                        persistent_workers=False, pin_memory=cuda)
    amp = torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
        if cuda and fcfg.amp else None
    bar = tqdm(total=len(dataset), desc=f"embed {view.view_id}", unit="tile", disable=not progress)
    if on_start:
        on_start()
    current, parts, error = -1, [], None
    rows_of = {int(slide_of[a]): (int(a), int(b)) for a, b in zip(batches.bounds[:-1], batches.bounds[1:])}

    def finished() -> SlideVectors:
        rows = np.arange(*rows_of[current])
        source = dataset.slides[current]
        vectors = None if error else np.concatenate(parts).astype(np.float32, copy=False)
        return SlideVectors(source.slide_id, [dataset.tile_ids[i] for i in rows], dataset.tiles[rows, 1],
                            dataset.tiles[rows, 2], source.size, vectors, error)

    try:
        for index, pixels, errors in loader:
            slide = int(slide_of[int(index[0])])
            if slide != current:
                if current >= 0:
                    yield finished()
                current, parts, error = slide, [], None
            error = error or next((e for e in errors if e), None)
            x = pixels.to(device, non_blocking=cuda)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), (amp or contextlib.nullcontext()):
                out = model(x.float() / 255.0)
            parts.append(out.float().cpu().numpy())
            bar.update(len(index))
        if current >= 0:
            yield finished()
    finally:
        bar.close()
        dataset.close()


class ViewWriter:
    """Writes finished slides into the view's tables ``commit_every_slides`` at a time (one commit per table),
    then their ledger rows; a failed slide gets its ledger row with the reason and no vectors."""

    def __init__(self, plan: ViewPlan, tables: dict) -> None:
        self.plan, self.tables = plan, tables
        self.pending: list[SlideVectors] = []
        self.started = utcnow()

    def add(self, slide: SlideVectors) -> None:
        self.pending.append(slide)
        if len(self.pending) >= self.plan.cfg.features.commit_every_slides:
            self.flush()

    def kept(self) -> str:
        """What a run stopped by the machine keeps, for its message."""
        n = self.plan.report.count("embedded")
        return (f"the {n} slides committed before it are kept, the rest were not attempted" if n else
                "nothing was committed") + "; SQL and search read the view as of its last complete commit"

    def flush(self) -> None:
        if not self.pending:
            return
        plan, view, report = self.plan, self.plan.view, self.plan.report
        ledger, kept = [], self.kept()  # what a fault in this flush keeps: the slides committed before it
        # a tile the machine could not read (a failing disk, no file handles) is no fault of the slide: not attempted
        stopped = next((s for s in self.pending if s.error is not None and machine_errno(s.error) is not None), None)
        good = [s for s in self.pending if s.error is None]
        failed = [s for s in self.pending if s.error is not None and machine_errno(s.error) is None]
        for s in failed:
            log.warning("%s: not embedded: %s", s.slide_id, s.error)
            report.outcomes.append(EmbedOutcome(s.slide_id, "failed", reason=s.error))
            ledger.append({"slide_id": s.slide_id, "content_hash": plan.slides[s.slide_id]["content_hash"],
                           "rows": 0, "status": "failed", "error": s.error, "started_at": self.started})
        if good or failed:
            with machine_faults_told(f"writing the vectors of {len(good)} slides to view {view.view_id}", kept):
                tile_version = self._write(good, [s.slide_id for s in failed])
                failpoint("embed.committed")  # vectors written, ledger not yet: a rerun rewrites them in place
            for s in good:
                n = len(s.tile_ids)
                report.outcomes.append(EmbedOutcome(s.slide_id, "embedded", n))
                report.tiles_embedded += n
                ledger.append({"slide_id": s.slide_id, "content_hash": plan.slides[s.slide_id]["content_hash"],
                               "rows": n, "status": "ok", "lance_version": tile_version, "started_at": self.started})
        with machine_faults_told(f"recording the ledger of view {view.view_id}", kept):
            record_materializations(Catalog.of(plan.ws), view.view_id, ledger, self.tables)
        self.pending = []
        if stopped is not None:
            report.outcomes.append(EmbedOutcome(stopped.slide_id, NOT_ATTEMPTED, reason=stopped.error))
            raise MachineFault(machine_errno(stopped.error), f"reading the tiles of slide {stopped.slide_id}",
                               self.kept(), stopped.error.splitlines()[0][:200])

    def _write(self, good: list[SlideVectors], failed: list[str]) -> int:
        """Write the good slides' vectors, and remove any rows the failed slides have (left by a step whose ledger
        commit never happened); returns the tile table's version."""
        tiles, slides = self.plan.view.table(TILE_KIND), self.plan.view.table(SLIDE_KIND)
        tile_batch, slide_batch = self._batches(good) if good else (tiles.schema().empty_table(),
                                                                    slides.schema().empty_table())
        sids = [s.slide_id for s in good] + failed
        version = upsert_slides(self.tables[TILE_KIND], tiles, tile_batch, sids)
        failpoint("embed.tiles_written")  # the tile table written, the slide table not yet
        upsert_slides(self.tables[SLIDE_KIND], slides, slide_batch, sids)
        return version

    def _batches(self, good: list[SlideVectors]):
        """The tile and slide rows of ``good`` as batches of the view's tables."""
        view = self.plan.view
        tile_cols: dict[str, list] = {k: [] for k in ("tile_id", "slide_id", "patient_id", "x", "y", "size")}
        slide_cols: dict[str, list] = {k: [] for k in ("slide_id", "patient_id", "n_tiles")}
        attrs = {c: [] for c in view.attribute_columns}
        tile_attrs = {c: [] for c in view.attribute_columns}
        for s in good:
            meta = self.plan.slides[s.slide_id]
            a = _attributes(meta, view.attribute_columns)
            n = len(s.tile_ids)
            tile_cols["tile_id"] += s.tile_ids
            tile_cols["slide_id"] += [s.slide_id] * n
            tile_cols["patient_id"] += [meta["patient_id"]] * n
            tile_cols["x"] += s.x.tolist()
            tile_cols["y"] += s.y.tolist()
            tile_cols["size"] += [s.size] * n
            for c in view.attribute_columns:
                tile_attrs[c] += [a[c]] * n
                attrs[c].append(a[c])
            slide_cols["slide_id"].append(s.slide_id)
            slide_cols["patient_id"].append(meta["patient_id"])
            slide_cols["n_tiles"].append(n)
        tile_cols["vector"] = np.concatenate([s.vectors for s in good])
        slide_cols["vector"] = np.stack([s.vectors.mean(axis=0) for s in good])
        tiles, slides = view.table(TILE_KIND), view.table(SLIDE_KIND)
        return to_batch(tiles, {**tile_cols, **tile_attrs}), to_batch(slides, {**slide_cols, **attrs})
