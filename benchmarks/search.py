"""Vector search at scale: LanceDB ANN vs exact search vs scanning one feature file per slide.

    python benchmarks/search.py [--n 1000000] [--dim 512] [--queries 100] [--index IVF_HNSW_SQ|IVF_PQ]

Synthetic vectors (n x dim, float32; clustered, or isotropic with --clusters 0) stand in for tile embeddings, ``--tiles-per-slide`` to a slide.
Prints, in one run on the same vectors and queries:
  - the index build time;
  - p50 / p99 latency of ANN search (k=10) and its recall@10 against exact search;
  - p50 / p99 latency of exact search (Lance flat scan, no index);
  - p50 / p99 latency of the paper pipeline's way: one feature file per slide (.npy here, .pt there), every
    file loaded and scored per query; and the speed-up ratios side by side.
The files and tables go to a temporary directory (several GB at 1M x 512) and are removed at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic(rng: np.random.Generator, n: int, dim: int, clusters: int) -> np.ndarray:
    """Gaussian clusters (embeddings of similar tissue cluster) with noise as large as the cluster offsets;
    ``clusters=0`` gives isotropic Gaussian vectors, the hardest case for any ANN index."""
    centers = rng.normal(size=(max(clusters, 1), dim)).astype(np.float32) * (1.0 if clusters else 0.0)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = centers[rng.integers(0, max(clusters, 1), stop - start)] + rng.normal(
            scale=1.0, size=(stop - start, dim)).astype(np.float32)
    return out


def percentiles(times: list[float]) -> tuple[float, float]:
    ms = np.asarray(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def exact_topk(unit: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    q = query / np.linalg.norm(query)
    scores = unit @ q
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--tiles-per-slide", type=int, default=1000)
    parser.add_argument("--index", choices=["IVF_HNSW_SQ", "IVF_PQ"], default="IVF_HNSW_SQ")
    parser.add_argument("--nprobes", type=int, default=20)
    parser.add_argument("--refine-factor", type=int, default=10)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=1000, help="0 = isotropic Gaussian (no structure)")
    args = parser.parse_args()

    from histcode.config import FeaturesConfig
    from histcode.features.search import nearest
    from histcode.features.upkeep import index_config
    from histcode.store.vectors import TILE_KIND, TableSpec, connect, open_table, to_batch

    rng = np.random.default_rng(0)
    n, dim, k = args.n, args.dim, args.k
    shape = f"{args.clusters} clusters" if args.clusters else "isotropic Gaussian"
    print(f"{n} x {dim} float32 vectors ({shape}), {n // args.tiles_per_slide} slides of {args.tiles_per_slide} tiles, "
          f"{args.queries} queries, k={k}", flush=True)
    data = synthetic(rng, n, dim, args.clusters)
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    queries = data[rng.choice(n, args.queries, replace=False)] + rng.normal(scale=0.1, size=(args.queries, dim)).astype(np.float32)

    with tempfile.TemporaryDirectory(prefix="histcode-search-") as tmp:
        root = Path(tmp)
        spec = TableSpec("fv-bench", TILE_KIND, dim, "synthetic")
        table = open_table(connect(root / "lance"), spec)
        t0 = time.perf_counter()
        for start in range(0, n, 100_000):
            stop = min(n, start + 100_000)
            slides = [f"s{i // args.tiles_per_slide}" for i in range(start, stop)]
            table.add(to_batch(spec, {"tile_id": [f"t{i}" for i in range(start, stop)], "slide_id": slides,
                                      "patient_id": slides, "x": [0] * (stop - start), "y": [0] * (stop - start),
                                      "size": [256] * (stop - start), "vector": data[start:stop]}))
        write_s = time.perf_counter() - t0
        cfg = FeaturesConfig(index_type=args.index, nprobes=args.nprobes, refine_factor=args.refine_factor)

        # exact: a flat scan of the Lance table, before any index exists
        exact_times = []
        for q in queries[: min(20, args.queries)]:
            t0 = time.perf_counter()
            nearest(table, q, k, None, cfg)
            exact_times.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        table.create_index("vector", config=index_config(cfg, n, dim))
        build_s = time.perf_counter() - t0

        ann_times, recalls = [], []
        for q in queries:
            t0 = time.perf_counter()
            hits = nearest(table, q, k, None, cfg)
            ann_times.append(time.perf_counter() - t0)
            truth = {f"t{i}" for i in exact_topk(unit, q, k)}
            recalls.append(len(truth & set(hits.column("tile_id").to_pylist())) / k)

        # the paper pipeline's storage: one feature file per slide, all scanned for every query
        files = root / "per_slide"
        files.mkdir()
        for s, start in enumerate(range(0, n, args.tiles_per_slide)):
            np.save(files / f"s{s}.npy", data[start:start + args.tiles_per_slide])
        scan_times = []
        paths = sorted(files.glob("*.npy"))
        for q in queries[: min(10, args.queries)]:
            t0 = time.perf_counter()
            qn = q / np.linalg.norm(q)
            best = np.full(k, -np.inf)
            for path in paths:
                feats = np.load(path)
                scores = (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ qn
                best = np.sort(np.concatenate([best, np.partition(scores, -k)[-k:] if len(scores) > k else scores]))[-k:]
            scan_times.append(time.perf_counter() - t0)

    ann50, ann99 = percentiles(ann_times)
    ex50, ex99 = percentiles(exact_times)
    sc50, sc99 = percentiles(scan_times)
    print(f"\nwrite {n} vectors to Lance: {write_s:.1f} s; {args.index} index build: {build_s:.1f} s")
    print(f"{'search':<36}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'LanceDB ANN (' + args.index + ')':<36}{ann50:>10.1f}{ann99:>10.1f}   recall@{k} {np.mean(recalls):.3f}")
    print(f"{'LanceDB exact (flat scan)':<36}{ex50:>10.1f}{ex99:>10.1f}")
    print(f"{'one file per slide, all scanned':<36}{sc50:>10.1f}{sc99:>10.1f}")
    print(f"speed-up of ANN over per-slide files (p50): {sc50 / ann50:.0f} : 1; over exact Lance scan: {ex50 / ann50:.0f} : 1")


if __name__ == "__main__":
    main()
