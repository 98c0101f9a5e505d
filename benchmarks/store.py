"""The feature store at cohort scale: commit cost, per-slide reads, heads' training-set memory, the catalog.

    python benchmarks/store.py [--sizes 10000 100000 1000000 2000000] [--dim 512] [--commit 10000]
                               [--tiles-per-slide 1000] [--no-legacy]

Drives the store code the pipeline calls (``open_table`` with its id indices, ``upsert_slides``,
``maintain_tables`` after every write as an embedding run does, ``tile_features`` for one slide,
``load_bags`` for the heads, ``Catalog.tiles``/``Catalog.query``) on synthetic vectors in a temporary
workspace. The table grows by upserts of whole slides; at each size in ``--sizes`` it prints, in one run:
  - seconds per ``--commit``-tile commit of new slides, and of re-embedded slides (rows replaced), median of 3;
  - with the legacy write beside it (the previous code path: one ``merge_insert`` whose
    ``when_not_matched_by_source_delete`` scans the table), unless ``--no-legacy``;
  - per-slide read ms (``tile_features(slide_ids=[one])``, median over 5 slides);
  - peak RSS of building the heads' training set (``load_bags``, in a fresh spawned process, above what the
    process held after its imports, sampled every 5 ms; malloc arenas capped as the CLI caps them,
    ``histcode.runtime.limit_malloc_arenas``, and again with glibc's default arenas) against reading the whole
    view into pandas (the previous ``load_bags``);
  - the catalog's ``tiles`` table at that many rows: file size and query times.
Then the ratios last : first. Several GB of disk at 2M x 512; removed at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VIEW_ID = "fv-storebench"


def _view(dim: int):
    from histcode.features.registry import FeatureView

    return FeatureView(VIEW_ID, "bench-encoder", "1", "adco", dim, "ts-bench", 112)


def _batch(spec, rng: np.random.Generator, first_slide: int, n_slides: int, per_slide: int):
    from histcode.store.vectors import to_batch

    n = n_slides * per_slide
    slides = np.repeat([f"BENCH-{first_slide + i:07d}" for i in range(n_slides)], per_slide)
    j = np.tile(np.arange(per_slide), n_slides)
    cols = {"tile_id": [f"{s}_{k}" for s, k in zip(slides, j)], "slide_id": slides.tolist(),
            "patient_id": slides.tolist(), "x": (j % 100) * 256, "y": (j // 100) * 256,
            "size": np.full(n, 256, np.int32), "vector": rng.standard_normal((n, spec.dim), dtype=np.float32),
            **{c: ["tumour"] * n for c in spec.attribute_columns}}
    return to_batch(spec, cols), sorted(set(slides.tolist()))


def _legacy_upsert(table, spec, batch, slide_ids) -> None:
    from histcode.store.vectors import slide_filter

    (table.merge_insert(spec.key).when_matched_update_all().when_not_matched_insert_all()
        .when_not_matched_by_source_delete(slide_filter(slide_ids)).execute(batch))


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss(root: str, dim: int, mode: str, queue, arenas: bool = True) -> None:
    import threading

    from histcode.features.read import tile_features
    from histcode.heads.data import load_bags
    from histcode.runtime import limit_malloc_arenas
    from histcode.workspace import Workspace

    if arenas:
        limit_malloc_arenas()  # as the histcode CLI and the flows do at start
    ws = Workspace(Path(root))
    base = _rss_mb()  # after the imports
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if mode == "bags":
        bags = load_bags(ws, _view(dim))
        n = sum(len(b.features) for b in bags.values())
    else:
        n = len(tile_features(ws, _view(dim), fmt="pandas"))
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    queue.put((max(peak[0], _rss_mb()) - base, seconds, n))


def peak_rss(root: Path, dim: int, mode: str, arenas: bool = True) -> tuple[float, float, int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss, args=(str(root), dim, mode, queue, arenas))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def catalog_figures(root: Path, rows: int, per_slide: int) -> tuple[float, float, float]:
    """(file MB, ms for one slide's tiles, ms for tiles per slide over the table) at ``rows`` tile rows."""
    from histcode.store.catalog import Catalog

    catalog = Catalog(root / "catalog.duckdb")
    with catalog.transaction() as con:
        have = con.sql("SELECT count(*) FROM tiles").fetchall()[0][0]
        if rows > have:
            con.execute(
                "INSERT INTO tiles SELECT printf('t%012d', i), printf('BENCH-%07d', i // ?), 'ts-bench', "
                "(i % 100) * 256, (i // 100) * 256, 256, 0, 0.9, 0.1, NULL FROM range(?, ?) r(i)",
                [per_slide, have, rows])
    one = f"BENCH-{(rows // per_slide) // 2:07d}"
    start = time.perf_counter()
    catalog.tiles(slide_id=one)
    single = time.perf_counter() - start
    start = time.perf_counter()
    catalog.query("SELECT slide_id, count(*) AS n FROM tiles GROUP BY 1")
    grouped = time.perf_counter() - start
    return (root / "catalog.duckdb").stat().st_size / 2**20, single * 1000, grouped * 1000


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 2_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--commit", type=int, default=10_000, help="tiles per measured commit")
    parser.add_argument("--grow", type=int, default=100_000, help="tiles per commit while growing the table")
    parser.add_argument("--tiles-per-slide", type=int, default=1000)
    parser.add_argument("--no-legacy", action="store_true", help="skip the previous write path")
    parser.add_argument("--dir", type=Path, default=None, help="work here instead of a temporary directory")
    args = parser.parse_args()

    from histcode.config import FeaturesConfig
    from histcode.features.read import tile_features
    from histcode.features.upkeep import maintain_tables, unindexed_rows
    from histcode.store.vectors import TILE_KIND, connect, open_table, upsert_slides
    from histcode.workspace import Workspace

    per = args.tiles_per_slide
    if args.commit % per or args.grow % per:
        parser.error("--commit and --grow must be multiples of --tiles-per-slide")
    rng = np.random.default_rng(0)
    tmp = tempfile.TemporaryDirectory(prefix="histcode-store-") if args.dir is None else None
    root = Path(tmp.name) if tmp else args.dir
    ws = Workspace(root).ensure()
    view = _view(args.dim)
    spec = view.table(TILE_KIND)
    table = open_table(connect(ws.lancedb_uri), spec)
    legacy_table = None if args.no_legacy else open_table(connect(root / "legacy"), spec)
    cfg = FeaturesConfig(index_min_rows=10**12)  # ANN index building is benchmarks/search.py's subject
    next_slide, rows_now = 0, 0
    results = []
    for size in sorted(args.sizes):
        start = time.perf_counter()
        while rows_now + args.commit < size:  # grow with whole slides to just below the size
            step = min(args.grow, size - args.commit - rows_now)
            step -= step % per
            if step <= 0:
                break
            batch, ids = _batch(spec, rng, next_slide, step // per, per)
            upsert_slides(table, spec, batch, ids)
            if legacy_table is not None:
                legacy_table.add(batch)
            maintain_tables({TILE_KIND: table}, cfg, changed=True)
            next_slide += step // per
            rows_now += step
        grow_s = time.perf_counter() - start
        times_new, times_replace = [], []
        for _ in range(3):
            batch, ids = _batch(spec, rng, next_slide, args.commit // per, per)
            start = time.perf_counter()
            upsert_slides(table, spec, batch, ids)
            times_new.append(time.perf_counter() - start)
            if legacy_table is not None:
                legacy_table.add(batch)
            maintain_tables({TILE_KIND: table}, cfg, changed=True)
            next_slide += args.commit // per
            rows_now += args.commit
        old = rng.integers(0, next_slide - args.commit // per)
        for _ in range(3):
            batch, ids = _batch(spec, rng, int(old), args.commit // per, per)
            start = time.perf_counter()
            upsert_slides(table, spec, batch, ids)
            times_replace.append(time.perf_counter() - start)
        legacy = float("nan")
        if legacy_table is not None:
            batch, ids = _batch(spec, rng, int(old), args.commit // per, per)
            start = time.perf_counter()
            _legacy_upsert(legacy_table, spec, batch, ids)
            legacy = time.perf_counter() - start
        picks = rng.integers(0, next_slide, 5)
        reads = [median_time(lambda s=s: tile_features(ws, view, slide_ids=[f"BENCH-{s:07d}"]), 1) for s in picks]
        bags_rss, bags_s, n_bags = peak_rss(root, args.dim, "bags")
        glibc_rss, _, _ = peak_rss(root, args.dim, "bags", arenas=False)
        whole_rss, whole_s, _ = peak_rss(root, args.dim, "pandas")
        cat_mb, cat_one, cat_group = catalog_figures(root, rows_now, per)
        row = {"rows": rows_now, "new_s": float(np.median(times_new)), "replace_s": float(np.median(times_replace)),
               "legacy_s": legacy, "read_ms": float(np.median(reads)) * 1000, "bags_rss": bags_rss, "bags_s": bags_s,
               "whole_rss": whole_rss, "whole_s": whole_s, "glibc_rss": glibc_rss, "cat_mb": cat_mb, "cat_one": cat_one,
               "cat_group": cat_group, "unindexed": unindexed_rows(table), "grow_s": grow_s}
        assert n_bags == rows_now, (n_bags, rows_now)
        results.append(row)
        print(f"{rows_now:>9,} rows (grown in {grow_s:6.1f} s): commit new {row['new_s']:.3f} s, replace "
              f"{row['replace_s']:.3f} s, legacy {legacy:.3f} s; slide read {row['read_ms']:.1f} ms; training set "
              f"peak RSS {bags_rss:.0f} MB ({bags_s:.1f} s; {glibc_rss:.0f} MB with glibc's default arenas) vs whole view in pandas {whole_rss:.0f} MB "
              f"({whole_s:.1f} s); catalog {cat_mb:.0f} MB, one slide {cat_one:.1f} ms, per-slide counts "
              f"{cat_group:.1f} ms; {row['unindexed']:,} rows unindexed", flush=True)
    first, last = results[0], results[-1]
    print(f"\nratios {last['rows']:,} : {first['rows']:,} rows (goal for commits <= 1.5)")
    for key, name in [("new_s", "commit of new slides"), ("replace_s", "commit replacing slides"),
                      ("legacy_s", "legacy commit"), ("read_ms", "per-slide read"),
                      ("bags_rss", "training-set peak RSS"), ("glibc_rss", "the same, glibc's default arenas"),
                      ("whole_rss", "whole view in pandas, peak RSS"),
                      ("cat_one", "catalog, one slide's tiles"), ("cat_group", "catalog, tiles per slide")]:
        if first[key] == first[key]:  # not NaN
            print(f"  {name:34s} {last[key] / first[key]:6.2f} : 1   ({first[key]:.3f} -> {last[key]:.3f})")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
