"""Tile one registered slide: tissue mask, grid at the target mpp, tissue fraction, optional pixel QC.

Runs anywhere (a worker process opens its own slide handle) and touches no store: it returns the ledger
row and the tile rows for the single catalog writer to commit. Zero tiles is a failure with a reason, never a
silent success.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from histcode.config import TilingConfig
from histcode.workspace import file_stem
from histcode.wsi.files import file_signature
from histcode.store.records import FAILED, OK, TilingRecord
from histcode.tiling.spec import tile_id_of
from histcode.wsi import qc as tile_qc
from histcode.wsi.grid import grid_positions, tile_size_level0, tissue_fractions
from histcode.wsi.overlay import draw_qc_thumbnail, save_mask_png
from histcode.wsi.dispatch import open_slide
from histcode.wsi.reader import SlideReadError, plan_read, render_at_mpp
from histcode.wsi.tile_reader import TileReader
from histcode.runtime import resolve_device
from histcode.wsi.tissue import detect_tissue

log = logging.getLogger(__name__)

QC_PICTURE_SIDE = 1200  # longest side of the QC picture, in pixels


@dataclass
class SlideTiling:
    record: TilingRecord
    tiles: pa.Table | None


def failed_tiling(slide: dict, spec_id: str, reason: str, t0: float, **extra) -> SlideTiling:
    record = TilingRecord(
        slide_id=slide["slide_id"], spec_id=spec_id, content_hash=slide["content_hash"], status=FAILED,
        reason=reason, seconds=time.perf_counter() - t0, **extra,
    )
    return SlideTiling(record, None)


def tile_slide(slide: dict, cfg: TilingConfig, spec_id: str, qc_dir: Path) -> SlideTiling:
    """Tile one slide (a row of the catalog's ``slides`` table, status ok)."""
    t0 = time.perf_counter()
    path = Path(slide["path"])
    signature = file_signature(path)
    if signature is None:
        return failed_tiling(slide, spec_id, f"slide file is gone: {path}", t0)
    if signature != (slide["file_size"], slide["file_mtime"]):
        return failed_tiling(slide, spec_id, "slide file changed since it was ingested; run `histcode ingest` again", t0)
    mpp = float(slide["mpp_x"])
    size = tile_size_level0(cfg.tile_px, cfg.target_mpp, mpp)
    width, height = int(slide["width"]), int(slide["height"])
    positions = grid_positions(width, height, size)
    if len(positions) == 0:
        return failed_tiling(slide, spec_id, f"slide {width}x{height} px is smaller than one tile ({size} px at level 0)", t0,
                       tile_size_l0=size)
    try:
        with open_slide(path, slide.get("vendor")) as reader:
            low, low_ds = render_at_mpp(reader, mpp, cfg.mask.mpp)
            mask_mpp = low_ds[0] * mpp
            mask = detect_tissue(low, mask_mpp, low_ds, cfg.mask, resolve_device(cfg.device))
            picture_mpp = max(mpp * max(width, height) / QC_PICTURE_SIDE, cfg.mask.mpp / 4, mpp)
            thumb, thumb_ds = render_at_mpp(reader, mpp, picture_mpp) if picture_mpp < mask_mpp else (low, low_ds)
            fractions = tissue_fractions(mask.mask, mask.downsample, positions, size)
            tissue_ok = fractions >= cfg.min_tissue_fraction
            plan = plan_read(reader.level_downsamples, size, cfg.tile_px)
        white = np.full(len(positions), np.nan, dtype=np.float32)
        sharp = np.full(len(positions), np.nan, dtype=np.float32)
        qc_ok = np.ones(len(positions), dtype=bool)
        if cfg.qc.enabled:
            with TileReader.for_slide(slide, size, cfg.tile_px) as tiles:
                for i in np.flatnonzero(tissue_ok):
                    m = tile_qc.measure(tiles.read(positions[i, 0], positions[i, 1]), cfg.qc)
                    white[i], sharp[i] = m.white_fraction, m.laplacian_var
                    qc_ok[i] = m.reason(cfg.qc) is None
    except SlideReadError as exc:
        return failed_tiling(slide, spec_id, f"read failed: {exc}", t0, tile_size_l0=size)

    keep = tissue_ok & qc_ok
    n_keep = int(keep.sum())
    name = file_stem(slide["slide_id"])  # any id names a file inside qc_dir (never use with_suffix: ids hold dots)
    mask_path = save_mask_png(mask.mask, qc_dir / f"{name}.mask.png")
    thumb_path = draw_qc_thumbnail(thumb, thumb_ds, mask.mask, positions[keep], positions[tissue_ok & ~qc_ok], size,
                                   qc_dir / f"{name}.qc.png")
    counts = dict(
        n_candidates=len(positions),
        n_tiles=n_keep,
        n_rejected_tissue=int((~tissue_ok).sum()),
        n_rejected_qc=int((tissue_ok & ~qc_ok).sum()),
        tile_size_l0=size,
        read_level=plan.level,
        mask_threshold=mask.threshold,
        slide_tissue_fraction=mask.tissue_fraction,
        thumbnail_path=str(thumb_path),
        mask_path=str(mask_path),
    )
    if n_keep == 0:
        if not mask.mask.any():
            otsu = "no split" if mask.otsu is None else f"{mask.otsu:.3f}"
            reason = (f"no tissue detected (saturation threshold {mask.threshold:.3f}, Otsu {otsu}); "
                      "blank slide or tiling.mask too strict")
        elif not tissue_ok.any():
            reason = (f"no grid tile reaches min_tissue_fraction {cfg.min_tissue_fraction} "
                      f"(best {fractions.max():.2f}; tissue covers {mask.tissue_fraction:.1%} of the slide)")
        else:
            reason = f"all {int(tissue_ok.sum())} tissue tiles failed pixel QC (tiling.qc)"
        return failed_tiling(slide, spec_id, reason, t0, **counts)

    kept = positions[keep]
    ids = [tile_id_of(slide["content_hash"], spec_id, int(x), int(y), size) for x, y in kept]
    tiles = pa.table(
        {
            "tile_id": ids,
            "slide_id": [slide["slide_id"]] * n_keep,
            "spec_id": [spec_id] * n_keep,
            "x": kept[:, 0],
            "y": kept[:, 1],
            "size": np.full(n_keep, size, dtype=np.int32),
            "level": np.full(n_keep, plan.level, dtype=np.int32),
            "tissue_fraction": fractions[keep].astype(np.float32),
            "white_fraction": pa.array(white[keep], mask=np.isnan(white[keep])),  # null when QC is off
            "laplacian_var": pa.array(sharp[keep], mask=np.isnan(sharp[keep])),
        }
    )
    record = TilingRecord(
        slide_id=slide["slide_id"], spec_id=spec_id, content_hash=slide["content_hash"], status=OK,
        seconds=time.perf_counter() - t0, **counts,
    )
    log.debug("%s: %d/%d tiles (%s px at level 0, read level %d)", slide["slide_id"], n_keep, len(positions), size, plan.level)
    return SlideTiling(record, tiles)
