"""Materialisation fanned out over workers: the slides to do cut into shards of whole slides, each embedded by
a worker that stages its vectors as Arrow IPC files in a folder of its own (touching neither Lance nor the
catalog), then committed by the coordinator through the same ``ViewWriter`` as a one-process run, which alone
writes the ledger. Batches never span two slides (``SlideBatches``), so the rows are those of one process."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from histcode.config import HistcodeConfig
from histcode.features.embed import EmbedReport, SlideVectors, ViewPlan, ViewWriter, embed_slides, finish_view
from histcode.features.registry import FeatureView
from histcode.ssl.dataset import TileDataset
from histcode.tracking import Tracker
from histcode.workspace import Workspace


@dataclass
class StagedShard:
    """What one worker embedded: its slides' vectors staged under ``folder`` (Arrow IPC, one file per slide)."""

    folder: str
    slide_ids: list[str]
    tiles: int
    seconds: float


def shards(dataset: TileDataset, workers: int) -> list[TileDataset]:
    """``dataset`` cut into at most ``workers`` datasets of consecutive whole slides with about equal tile
    counts (a worker estimates its own slides' stains: an estimate depends on its slide alone)."""
    slide_of = dataset.tiles[:, 0]
    counts = np.bincount(slide_of, minlength=len(dataset.slides))
    cut = np.searchsorted(np.cumsum(counts), np.arange(1, workers) * counts.sum() / workers, side="left") + 1
    groups = [g for g in np.split(np.arange(len(dataset.slides)), np.unique(np.clip(cut, 1, len(counts)))) if len(g)]
    out = []
    for group in groups:
        rows = np.flatnonzero(np.isin(slide_of, group))
        tiles = dataset.tiles[rows].copy()
        tiles[:, 0] -= group[0]  # slide indices into this shard's own slide list
        out.append(TileDataset([dataset.slides[i] for i in group], tiles, dataset.tile_px, dataset.open_readers,
                               [dataset.tile_ids[i] for i in rows]))
    return out


def _staged_table(slide: SlideVectors) -> pa.Table:
    n = len(slide.tile_ids)
    vectors = slide.vectors if slide.vectors is not None else np.zeros((0, 0), dtype=np.float32)
    dim = vectors.shape[1] if vectors.size else 0
    values = pa.array(vectors.reshape(-1), pa.float32())
    column = pa.FixedSizeListArray.from_arrays(values, dim) if slide.error is None else pa.nulls(n, pa.null())
    meta = {"slide_id": slide.slide_id, "size": str(slide.size), "error": slide.error or ""}
    return pa.table({"tile_id": slide.tile_ids, "x": slide.x, "y": slide.y, "vector": column}).replace_schema_metadata(meta)


def _read_staged(path: Path) -> SlideVectors:
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    error = meta["error"] or None
    vectors = None
    if error is None:
        column = table.column("vector").combine_chunks()
        vectors = column.values.to_numpy(zero_copy_only=False).reshape(len(table), -1).astype(np.float32)
    return SlideVectors(meta["slide_id"], table.column("tile_id").to_pylist(), table.column("x").to_numpy(),
                        table.column("y").to_numpy(), int(meta["size"]), vectors, error)


def embed_shard(ws: Workspace, cfg: HistcodeConfig, view: FeatureView, dataset: TileDataset, folder: Path,
                progress: bool = False) -> StagedShard:
    """A worker's part: embed ``dataset``'s slides and stage each under ``folder`` (written to a temporary name,
    then renamed, so a staged file is always whole). Touches neither the view's tables nor the catalog."""
    folder.mkdir(parents=True, exist_ok=True)
    start, tiles, ids = time.perf_counter(), 0, []
    for slide in embed_slides(Tracker(ws), view, cfg.features, dataset, progress):
        table = _staged_table(slide)
        tmp = folder / f".{slide.slide_id}.arrow.tmp"
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as out:
            out.write_table(table)
        tmp.replace(folder / f"{slide.slide_id}.arrow")
        tiles += len(slide.tile_ids)
        ids.append(slide.slide_id)
    return StagedShard(str(folder), ids, tiles, time.perf_counter() - start)


def commit_shards(plan: ViewPlan, staged: list[StagedShard], tag: str | None = None,
                  seconds: float | None = None) -> EmbedReport:
    """The coordinator's part: write every staged slide through ``ViewWriter`` (in slide order, so the commits
    are those of one process), record the ledger, keep the tables, remove the staging folders. Slides of the
    plan that no shard staged (a lost worker) are failed with that reason and done by the next run."""
    tables = plan.tables()
    writer = ViewWriter(plan, tables)
    files = {p.stem: p for shard in staged for p in Path(shard.folder).glob("*.arrow")}
    for sid in sorted(plan.todo):
        if sid in files:
            writer.add(_read_staged(files[sid]))
        else:
            writer.add(SlideVectors(sid, [], np.zeros(0, np.int64), np.zeros(0, np.int64), 0, None,
                                    "no worker staged this slide (its shard failed: see the flow's logs)"))
    writer.flush()
    plan.report.workers = max(1, len(staged))
    plan.report.seconds = seconds if seconds is not None else max((s.seconds for s in staged), default=0.0)
    report = finish_view(plan, tables, changed=bool(plan.todo), tag=tag)
    for shard in staged:
        shutil.rmtree(shard.folder, ignore_errors=True)
    return report
