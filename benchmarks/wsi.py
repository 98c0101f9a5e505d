"""A slide of a scanner's size, at 20x and the same tissue at 40x, through every stage of ``histcode predict`` and
the viewer, side by side: seconds and peak memory per stage, and the ratio 40x : 20x.

    python benchmarks/wsi.py [--workspace DIR] [--quick] [--width 40960 --height 30720] [--slides DIR] [--json OUT]

The slides: a 40,960 x 30,720 px canvas at 0.5 um/px (20.5 x 15.4 mm, a scanner's whole scan area) composed by
the demo's own code (``histcode.demo.compose.compose_slide``: real LC25000 tiles, white-balanced, re-stained with
one slide stain, placed in simulated tissue outlines on glass) as a grid of tissue pieces of at most
``--block-cells`` source tiles a side (a whole-slide canvas at once would need ~20 GB), from the tiles of the
``val`` split (held aside: no demo slide, so no head, ever saw them). The 20x slide is that canvas; the 40x slide
is the same canvas upsampled twice per side as the demo makes its 40x slides (``compose.upsample``, computed a
row of storage tiles at a time: 81,920 x 61,440 px, 15 GB of pixels, is never held whole). Both are written by
the demo's writer (``histcode.demo.tiff_writer``) as Aperio SVS: 256 px JPEG tiles, a pyramid of 4x steps, the
scale in the description (``AppMag = 20|MPP = 0.5000``, ``AppMag = 40|MPP = 0.2500``) as Aperio scanners record
it. ``--quick`` makes an 8,192 x 6,144 px pair for a smoke run; ``--slides DIR`` writes the pair there, or reuses
a pair of the same size and seed already there.

The workspace: a copy of ``--workspace`` (one where ``histcode demo`` has run: registered heads, the training
cohort's feature view), or, without it, a temporary workspace where the demo runs first (as
``benchmarks/stain_shift.py`` does). Each stage runs in a process of its own (this script with ``--stage``), on
the 20x slide and then on the 40x one, calling what ``histcode predict`` calls, in its order:

  - ingest: ``ingest_sources`` into the inference cohort (``cohorts.predict``): open, read the scale, hash;
  - tiling: ``tile_slides`` (tissue mask, grid, QC picture, catalog write);
  - embedding: ``materialize`` in every registered head's view;
  - prediction: ``predict_slides`` (finds the slide ingested, tiled and embedded; loads and applies the heads,
    the out-of-distribution check);
  - viewer: ``histcode.viewer.deepzoom.DeepZoomTiles`` opens the slide and renders what OpenSeadragon asks for
    first in a 1400 x 850 viewport (every tile of the Deep Zoom levels up to 2 x 1400 px wide: the whole slide
    on screen) and then the viewport at full resolution at the slide's centre (6 x 4 tiles of the deepest level).

Seconds are the stage process's wall time (interpreter and imports included, as a command pays them) and, beside
them, the stage's own work as timed inside it; peak memory is the process's maximum resident set
(``os.wait4``'s ``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

for _key, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}.items():
    os.environ.setdefault(_key, _value)

FULL = (40960, 30720)  # width, height at 20x: the user's slide in issue 28
QUICK = (8192, 6144)
SOURCE_SPLIT = "val"  # tiles no demo slide holds
STAGES = ("ingest", "tiling", "embedding", "prediction", "viewer")
VIEWPORT = (1400, 850)
WRITER_VERSION = "1"  # bump when the slides written for a size and seed change


class RowsOf:
    """``Bands`` (``histcode.demo.tiff_writer``) over an array, e.g. a memory-mapped canvas."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape = array, tuple(array.shape)

    def rows(self, y0: int, y1: int) -> np.ndarray:
        return np.asarray(self.array[y0:y1])


class Upsampled:
    """``Bands`` of ``source`` upsampled ``factor`` times per side, row for row what ``compose.upsample`` gives on
    the whole image (bilinear, the same sampling positions: each band is cut from a few source rows more than it
    covers and resized with PIL's ``box``)."""

    MARGIN = 2  # source rows beyond the band on each side: more than the bilinear kernel reaches

    def __init__(self, source, factor: int = 2) -> None:
        h, w = source.shape[:2]
        self.source, self.factor, self.shape = source, factor, (h * factor, w * factor, 3)

    def rows(self, y0: int, y1: int) -> np.ndarray:
        from PIL import Image

        f, (h, w) = self.factor, self.source.shape[:2]
        s0, s1 = max(0, y0 // f - self.MARGIN), min(h, -(-y1 // f) + self.MARGIN)
        band = Image.fromarray(np.ascontiguousarray(self.source.rows(s0, s1)))
        box = (0, y0 / f - s0, w, y1 / f - s0)
        return np.asarray(band.resize((w * f, y1 - y0), Image.Resampling.BILINEAR, box=box))


@dataclass(frozen=True)
class SlidePair:
    paths: dict[int, Path]  # magnification -> slide file
    width: int  # at 20x
    height: int
    pieces: int  # tissue pieces composed
    cells: int  # source tiles placed
    seconds: float  # composing and writing both


def _split(n: int, most: int) -> list[int]:
    """``n`` cells in near-equal runs of at most ``most``."""
    parts = max(1, math.ceil(n / most))
    return [len(a) for a in np.array_split(np.arange(n), parts)]


def _compose_piece(plan, pools, cells, tile_um, mask_mpp, measures, canvas: Path, shape, y0: int, x0: int) -> int:
    """Compose one tissue piece and paste it into the memory-mapped canvas (clipped to it); its cell count."""
    from histcode.demo.compose import compose_slide

    piece = compose_slide(plan, pools, cells, tile_um, mask_mpp, measures)
    out = np.memmap(canvas, dtype=np.uint8, mode="r+", shape=shape)
    h, w = min(piece.image.shape[0], shape[0] - y0), min(piece.image.shape[1], shape[1] - x0)
    out[y0:y0 + h, x0:x0 + w] = piece.image[:h, :w]
    out.flush()
    return len(piece.provenance)


def compose_canvas(canvas: Path, width: int, height: int, seed: int, block_cells: int, workers: int,
                   quiet: bool = False) -> tuple[np.memmap, int, int]:
    """The 20x canvas (height, width, 3) at ``canvas`` (memory-mapped), composed as tissue pieces of at most
    ``block_cells`` source tiles a side, each with its own outline and tumour region, all in one slide stain.
    Returns the canvas, the number of pieces and of source tiles placed."""
    from histcode.config import DemoConfig
    from histcode.demo.compose import BASE_MPP
    from histcode.demo.pixels import measure_sources
    from histcode.demo.plan import SUBTYPE_CLASS, SlidePlan, load_source_tiles
    from histcode.workspace import bundled_source_dir
    from histcode.wsi.stain import draw_stain

    cfg = DemoConfig()
    tiles = load_source_tiles(bundled_source_dir(), SOURCE_SPLIT)
    measures = measure_sources(tiles, cfg.white_balance).tiles
    pools = {"normal": [t for t in tiles if t.label == "lung_n"],
             "tumour": [t for t in tiles if t.label == SUBTYPE_CLASS["LUAD"]]}
    used = {str(t.path): measures[str(t.path)] for pool in pools.values() for t in pool}
    rng = np.random.default_rng(seed)
    stain = draw_stain(rng, cfg.stain_site_angle, cfg.stain_site_scale)
    base = SlidePlan(slide_id="bench-wsi", patient_id="bench-wsi", sample_type="tumor", subtype="LUAD", fmt="aperio",
                     magnification=20, tumour_fraction=0.0, coverage=0.5, seed=0, site_stain=stain, stain=stain)
    cell_px = round(cfg.tile_um / BASE_MPP)
    shape = (height, width, 3)
    out = np.memmap(canvas, dtype=np.uint8, mode="w+", shape=shape)
    del out
    jobs, y0 = [], 0
    for rows in _split(math.ceil(height / cell_px), block_cells):
        x0 = 0
        for cols in _split(math.ceil(width / cell_px), block_cells):
            plan = dataclasses.replace(base, tumour_fraction=float(rng.uniform(*cfg.tumour_fraction)),
                                       coverage=float(rng.uniform(0.4, 0.6)), seed=int(rng.integers(0, 2**31 - 1)))
            jobs.append((plan, pools, (rows, cols), cfg.tile_um, cfg.mask_mpp, used, canvas, shape, y0, x0))
            x0 += cols * cell_px
        y0 += rows * cell_px
    if not quiet:
        print(f"composing {len(jobs)} tissue pieces into a {width} x {height} px canvas ...", flush=True)
    if workers <= 1:
        placed = [_compose_piece(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            placed = list(pool.map(_compose_piece, *zip(*jobs)))
    return np.memmap(canvas, dtype=np.uint8, mode="r", shape=shape), len(jobs), sum(placed)


def write_pair(folder: Path, width: int, height: int, seed: int = 28, block_cells: int = 46, workers: int = 2,
               quality: int | None = None, quiet: bool = False) -> SlidePair:
    """The 20x slide and the same tissue at 40x in ``folder`` (reused when a pair of these settings is there)."""
    from histcode.config import DemoConfig
    from histcode.demo.tiff_writer import write_aperio_svs

    quality = quality or DemoConfig().jpeg_quality
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"writer": WRITER_VERSION, "width": width, "height": height, "seed": seed, "block_cells": block_cells,
                "quality": quality}
    paths = {mag: folder / f"bench-wsi-{mag}x.svs" for mag in (20, 40)}
    stamp = folder / "pair.json"
    if stamp.is_file() and all(p.is_file() for p in paths.values()):
        kept = json.loads(stamp.read_text())
        if kept["settings"] == settings:
            return SlidePair(paths, width, height, kept["pieces"], kept["cells"], kept["seconds"])
    t0 = time.perf_counter()
    canvas_path = folder / "canvas-20x.u8"
    canvas, pieces, cells = compose_canvas(canvas_path, width, height, seed, block_cells, workers, quiet)
    base = RowsOf(canvas)
    for mag, image in ((20, base), (40, Upsampled(base, 2))):
        if not quiet:
            print(f"writing {paths[mag].name} ({image.shape[1]} x {image.shape[0]} px) ...", flush=True)
        write_aperio_svs(paths[mag], image, 0.5 * 20 / mag, mag, quality, paths[mag].stem)
    del canvas, base
    canvas_path.unlink()
    seconds = time.perf_counter() - t0
    stamp.write_text(json.dumps({"settings": settings, "pieces": pieces, "cells": cells, "seconds": seconds}))
    return SlidePair(paths, width, height, pieces, cells, seconds)


# --- one stage, in its own process ----------------------------------------------------------------------------

def first_view(path: str) -> dict:
    """What a viewer asks for first: every tile of the Deep Zoom levels at most twice the viewport wide (the
    whole slide on screen), then the viewport at full resolution at the slide's centre."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    from histcode.viewer.deepzoom import OVERLAP, TILE_SIZE, DeepZoomTiles

    with openslide.OpenSlide(path) as slide:  # the pyramid's geometry, as benchmarks/viewer.py takes it
        dz = DeepZoomGenerator(slide, TILE_SIZE, OVERLAP)
        sizes, grids = dz.level_dimensions, dz.level_tiles
    overview = [(level, c, r) for level, (w, _) in enumerate(sizes) if w <= 2 * VIEWPORT[0]
                for c in range(grids[level][0]) for r in range(grids[level][1])]
    deepest = len(sizes) - 1
    across, down = math.ceil(VIEWPORT[0] / TILE_SIZE), math.ceil(VIEWPORT[1] / TILE_SIZE)
    c0, r0 = grids[deepest][0] // 2 - across // 2, grids[deepest][1] // 2 - down // 2
    centre = [(deepest, c, r) for c in range(c0, c0 + across) for r in range(r0, r0 + down)]
    tiles = DeepZoomTiles()
    seconds = []
    for batch in (overview, centre):
        t0 = time.perf_counter()
        for level, c, r in batch:
            tiles.tile(path, level, c, r)
        seconds.append(time.perf_counter() - t0)
    tiles.close()
    return {"overview_s": seconds[0], "overview_tiles": len(overview), "full_res_s": seconds[1],
            "full_res_tiles": len(centre)}


def run_stage(stage: str, workspace: Path, path: Path) -> dict:
    """The stage on one slide, as ``histcode predict`` runs it: what it did, and ``work_s``, its time after the
    imports."""
    if stage == "viewer":  # the viewer's process imports what the app does, not the pipeline
        t0 = time.perf_counter()
        return {**first_view(str(path)), "work_s": time.perf_counter() - t0}
    from histcode.apps.predict import predict_slides, registered_heads
    from histcode.features.embed import materialize
    from histcode.ingest.run import ingest_sources
    from histcode.ingest.sources import SlideSource
    from histcode.store.catalog import INFERENCE, Catalog
    from histcode.tiling.run import tile_slides
    from histcode.tracking import Tracker, telemetry_off
    from histcode.workspace import Workspace

    telemetry_off()
    t0 = time.perf_counter()
    ws = Workspace(workspace)
    cfg = ws.config()
    catalog = Catalog.of(ws)
    slide_id = path.stem
    source = SlideSource(path, slide_id, slide_id)
    if stage == "ingest":
        o = ingest_sources([source], catalog, cfg.ingest, progress=False, cohort=cfg.cohorts.predict, role=INFERENCE,
                           keep_other_cohorts=True).outcomes[0]
        result = {"status": o.status, "reason": o.reason}
    elif stage == "tiling":
        o = tile_slides(catalog, cfg.tiling, ws.outputs_dir / "qc", slide_ids=[slide_id], progress=False).outcomes[0]
        row = next(r for r in catalog.tilings() if r["slide_id"] == slide_id)
        result = {"status": o.status, "reason": o.reason, "tiles": o.n_tiles, "candidates": o.n_candidates,
                  "tile_slide_s": o.seconds, "read_level": row["read_level"], "tile_size_l0": row["tile_size_l0"]}
    elif stage == "embedding":
        views = {}
        for view_id, head in {h.view_id: h for h in registered_heads(Tracker(ws)).values()}.items():
            report = materialize(ws, cfg, encoder=head.encoder_uri.removeprefix("models:/"), slide_ids=[slide_id],
                                 progress=False)
            views[view_id] = {"tiles": report.tiles_embedded, "tiles_per_s": report.tiles_per_s,
                              "failed": [o.reason for o in report.failed]}
        result = {"status": "failed" if any(v["failed"] for v in views.values()) else "ok", "views": views}
    elif stage == "prediction":
        row = predict_slides(ws, cfg, [source], progress=False).predictions.iloc[0]
        result = {"status": row.status, "reason": row.reason, "p_tumor": float(row.p_tumor),
                  "in_distribution": None if row.in_distribution != row.in_distribution else bool(row.in_distribution)}
    else:
        raise ValueError(f"unknown stage {stage}")
    return {**result, "work_s": time.perf_counter() - t0}


def timed_stage(stage: str, workspace: Path, path: Path, log: Path) -> dict:
    """``run_stage`` in a child process: its wall time, its own peak resident memory and what it reported."""
    out = log.with_suffix(".json")
    command = [sys.executable, __file__, "--stage", stage, "--workspace", str(workspace), "--slide", str(path),
               "--json", str(out)]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        child = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0 or not out.is_file():
        raise SystemExit(f"stage {stage} on {path.name} exited {child.returncode}; its log: {log}")
    result = json.loads(out.read_text())
    if result.get("status", "ok") != "ok":
        raise SystemExit(f"stage {stage} on {path.name}: {result.get('reason')}; its log: {log}")
    return {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, **result}


# --- the report ---------------------------------------------------------------------------------------------

def _ratio(a: float, b: float) -> str:
    return f"{b / a:.2f} : 1" if a else "n/a"


def table(results: dict[int, dict[str, dict]], pair: SlidePair) -> str:
    lo, hi = results[20], results[40]
    lines = [f"| stage | 20x s (work) | 40x s (work) | 40x : 20x | 20x peak MB | 40x peak MB | 40x : 20x |",
             "|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        a, b = lo[stage], hi[stage]
        lines.append(f"| {stage} | {a['seconds']:.1f} ({a['work_s']:.1f}) | {b['seconds']:.1f} ({b['work_s']:.1f}) | "
                     f"{_ratio(a['seconds'], b['seconds'])} | {a['peak_mb']:,.0f} | {b['peak_mb']:,.0f} | "
                     f"{_ratio(a['peak_mb'], b['peak_mb'])} |")
    total = {m: sum(results[m][s]["seconds"] for s in STAGES[:4]) for m in (20, 40)}
    peak = {m: max(results[m][s]["peak_mb"] for s in STAGES[:4]) for m in (20, 40)}
    lines.append(f"| ingest to prediction | {total[20]:.1f} | {total[40]:.1f} | {_ratio(total[20], total[40])} | "
                 f"{peak[20]:,.0f} | {peak[40]:,.0f} | {_ratio(peak[20], peak[40])} |")
    t20, t40 = lo["tiling"], hi["tiling"]
    v20, v40 = lo["viewer"], hi["viewer"]
    lines += ["", f"slides: {pair.width} x {pair.height} px at 0.5 um/px and {2 * pair.width} x {2 * pair.height} at "
              f"0.25 um/px ({pair.pieces} tissue piece{'s' if pair.pieces != 1 else ''}, {pair.cells:,} source tiles placed; composed and written in "
              f"{pair.seconds:.0f} s; {pair.paths[20].stat().st_size / 2**20:,.0f} MB and "
              f"{pair.paths[40].stat().st_size / 2**20:,.0f} MB)",
              f"tiling: {t20['tiles']:,} / {t40['tiles']:,} tiles of {t20['candidates']:,} / {t40['candidates']:,} grid "
              f"positions, {t20['tile_size_l0']} / {t40['tile_size_l0']} px at level 0; tile_slide itself "
              f"{t20['tile_slide_s']:.2f} s / {t40['tile_slide_s']:.2f} s ({_ratio(t20['tile_slide_s'], t40['tile_slide_s'])})",
              f"viewer: whole slide on screen ({v20['overview_tiles']} / {v40['overview_tiles']} tiles) "
              f"{v20['overview_s']:.2f} s / {v40['overview_s']:.2f} s; the centre at full resolution "
              f"({v20['full_res_tiles']} tiles) {v20['full_res_s']:.2f} s / {v40['full_res_s']:.2f} s"]
    for m in (20, 40):
        views = results[m]["embedding"]["views"]
        lines.append(f"embedding {m}x: " + "; ".join(f"{v['tiles']:,} tiles at {v['tiles_per_s']:.1f} tiles/s"
                                                      for v in views.values()))
    p20, p40 = lo["prediction"], hi["prediction"]
    lines.append(f"p_tumor: {p20['p_tumor']:.3f} at 20x, {p40['p_tumor']:.3f} at 40x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help="a workspace where `histcode demo` has run (copied; default: "
                        "the demo runs in a temporary one)")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK[0]} x {QUICK[1]} px slide: a smoke run")
    parser.add_argument("--width", type=int, help=f"20x slide width in px (default {FULL[0]})")
    parser.add_argument("--height", type=int, help=f"20x slide height in px (default {FULL[1]})")
    parser.add_argument("--block-cells", type=int, default=46, help="most source tiles a side of one tissue piece")
    parser.add_argument("--seed", type=int, default=28)
    parser.add_argument("--slides", type=Path, help="write the slide pair here, or reuse the pair already there")
    parser.add_argument("--json", type=Path, help="write every figure here (with --stage: the stage's result)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage:  # a child: one stage on one slide
        args.json.write_text(json.dumps(run_stage(args.stage, args.workspace, args.slide), default=str))
        return

    from benchmarks.stain_shift import copy_workspace, demo_in

    width, height = QUICK if args.quick else FULL
    width, height = args.width or width, args.height or height
    with tempfile.TemporaryDirectory(prefix="histcode-bench-wsi-") as tmp_name:
        tmp = Path(tmp_name)
        pair = write_pair(args.slides or tmp / "slides", width, height, args.seed, args.block_cells)
        print(f"slides: {', '.join(str(p) for p in pair.paths.values())} ({pair.seconds:.0f} s)", flush=True)
        ws = copy_workspace(args.workspace.resolve(), tmp / "ws") if args.workspace else demo_in(tmp / "ws")
        results: dict[int, dict[str, dict]] = {20: {}, 40: {}}
        for stage in STAGES:
            for mag in (20, 40):
                r = timed_stage(stage, ws.root, pair.paths[mag], tmp / f"{stage}-{mag}x.log")
                results[mag][stage] = r
                print(f"{stage:<11} {mag}x {r['seconds']:7.1f} s (work {r['work_s']:6.1f} s) peak {r['peak_mb']:7,.0f} MB",
                      flush=True)
        print()
        print(table(results, pair))
        if args.json:
            args.json.write_text(json.dumps({"width": width, "height": height, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
