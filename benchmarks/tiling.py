"""Tiling throughput, and tile reads by the project's reader vs a plain OpenSlide read_region loop.

    python benchmarks/tiling.py [--workspace DIR] [--repeats 3]

On the demo cohort (built and ingested into a temporary workspace unless --workspace holds one), it measures,
in the same run and on the same tiles:
  1. tiling: slides/s, grid positions/s and tiles/s of `tile_slides` (mask + grid + catalog writes);
  2. reading every tile at the spec's resolution (256 px at 0.5 um/px), as tiles/s and megapixels/s:
     the project's TileReader vs a plain loop of OpenSlide read_region (+ RGB conversion and, for 40x slides,
     the resize a plain loop needs too), each with 1 and 2 processes (slides split between them);
  3. grid alignment: the same reads on a grid shifted by half a tile, so each tile straddles 4 stored tiles.
Every figure is the best of --repeats timed passes after one warm-up pass (the OS file cache is warm for both).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cohort import demo_workspace  # noqa: E402

TILE_PX = 256


def plain_openslide(jobs: list[tuple]) -> int:
    """What a user writes without the project: one read_region per tile at level 0."""
    import openslide
    from PIL import Image

    n = 0
    for path, _vendor, _dims, _ds, positions, size in jobs:
        with openslide.OpenSlide(path) as slide:
            for x, y in positions:
                image = slide.read_region((x, y), 0, (size, size)).convert("RGB")
                if size != TILE_PX:
                    image = image.resize((TILE_PX, TILE_PX), Image.Resampling.BOX)
                n += 1
    return n


def project_reader(jobs: list[tuple]) -> int:
    from histcode.wsi.tile_reader import TileReader

    n = 0
    for path, vendor, dims, ds, positions, size in jobs:
        with TileReader(path, vendor, dims, ds, size, TILE_PX) as reader:
            for x, y in positions:
                reader.read(x, y)
                n += 1
    return n


def _split(jobs: list[tuple], parts: int) -> list[list[tuple]]:
    """Balance slides between processes by tile count."""
    buckets: list[list[tuple]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for job in sorted(jobs, key=lambda j: -len(j[4])):
        i = loads.index(min(loads))
        buckets[i].append(job)
        loads[i] += len(job[4])
    return buckets


def timed(fn, jobs: list[tuple], pool: ProcessPoolExecutor | None, repeats: int) -> tuple[float, int]:
    """Best wall time over ``repeats`` passes (after a warm-up pass) and the tiles read per pass."""
    def once() -> int:
        if pool is None:
            return fn(jobs)
        return sum(pool.map(fn, _split(jobs, pool._max_workers)))  # noqa: SLF001

    n = once()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    return best, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help="a workspace with the demo cohort ingested (default: a temp one)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from histcode.store.catalog import Catalog
    from histcode.tiling.run import tile_slides

    ws, tmp = demo_workspace(args.workspace)
    cfg = ws.config()
    catalog = Catalog.of(ws)

    # 1. tiling throughput (forced, so every slide is processed)
    t0 = time.perf_counter()
    report = tile_slides(catalog, cfg.tiling, ws.outputs_dir / "qc", force=True, progress=False)
    tiling_s = time.perf_counter() - t0
    n_slides = len(report.outcomes)
    n_candidates = sum(o.n_candidates or 0 for o in report.outcomes)

    slides = {s["slide_id"]: s for s in catalog.slides(status="ok")}
    tiles = catalog.tiles(spec_id=report.spec_id).to_pandas()
    jobs, shifted = [], []
    for sid, group in tiles.groupby("slide_id"):
        s = slides[sid]
        size = int(group["size"].iloc[0])
        pos = list(zip(group.x.astype(int), group.y.astype(int)))
        half = size // 2
        inside = [(x + half, y + half) for x, y in pos if x + half + size <= s["width"] and y + half + size <= s["height"]]
        jobs.append((s["path"], s["vendor"], s["level_dimensions"], s["level_downsamples"], pos, size))
        shifted.append((s["path"], s["vendor"], s["level_dimensions"], s["level_downsamples"], inside, size))
    n_tiles = sum(len(j[4]) for j in jobs)
    mpx = TILE_PX * TILE_PX / 1e6

    print(f"\ncohort: {n_slides} slides, {n_candidates} grid positions, {n_tiles} tiles of {TILE_PX} px "
          f"at {cfg.tiling.target_mpp} um/px ({sum(s['mpp_x'] < 0.4 for s in slides.values())} slides at 40x)")
    print(f"\n1. tiling (mask + grid + catalog): {tiling_s:.2f} s = {n_slides / tiling_s:.1f} slides/s, "
          f"{n_candidates / tiling_s:.0f} grid positions/s, {report.n_tiles / tiling_s:.0f} tiles/s")

    results = {}
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        pool.submit(int).result()  # start the workers before timing
        list(pool.map(project_reader, [[], []]))  # and import the reader in both
        for name, fn in (("plain OpenSlide loop", plain_openslide), ("project TileReader", project_reader)):
            for procs in (1, 2):
                secs, n = timed(fn, jobs, None if procs == 1 else pool, args.repeats)
                results[(name, procs)] = n / secs
            secs, n = timed(fn, shifted, None, args.repeats)
            results[(name, "shifted")] = n / secs

    print("\n2. reading every tile (best of", args.repeats, "passes, warm file cache)")
    print(f"   {'reader':<24}{'procs':>6}{'tiles/s':>10}{'Mpx/s':>9}")
    for (name, procs), rate in results.items():
        if procs != "shifted":
            print(f"   {name:<24}{procs:>6}{rate:>10.0f}{rate * mpx:>9.1f}")
    plain1, plain2 = results[("plain OpenSlide loop", 1)], results[("plain OpenSlide loop", 2)]
    proj1, proj2 = results[("project TileReader", 1)], results[("project TileReader", 2)]
    print(f"   ratio project : plain, 1 process   = {proj1 / plain1:.2f} : 1")
    print(f"   ratio project : plain, 2 processes = {proj2 / plain2:.2f} : 1")
    print(f"   scaling 2 : 1 processes            = {proj2 / proj1:.2f} (project), {plain2 / plain1:.2f} (plain)")
    print(f"   project with 2 processes : plain loop in 1 process = {proj2 / plain1:.2f} : 1")

    print("\n3. grid alignment (1 process): aligned : shifted by half a tile")
    for name in ("plain OpenSlide loop", "project TileReader"):
        print(f"   {name:<24}{results[(name, 1)]:>8.0f} : {results[(name, 'shifted')]:.0f} tiles/s "
              f"= {results[(name, 1)] / results[(name, 'shifted')]:.2f} : 1")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
