"""Tile search at scale: LanceDB ANN indices against exact search, on clustered vectors and on vectors drawn from
real demo embeddings' statistics, with the index parameters chosen here and written back as the defaults.

    python benchmarks/search.py [--n 1000000] [--vectors clustered|isotropic|real] [--dim 512|256]
                                [--grid IVF_HNSW_SQ:0.064 IVF_PQ:1:16] [--nprobes 6 8] [--refine 0 2]
                                [--target-recall 0.95] [--target-ms 10] [--write-params params.yaml]
    python benchmarks/search.py --fit-from WORKSPACE_OR_LANCE_TABLE --out benchmarks/data/NAME.npz

Queries are tiles of the table searched as `histcode search --tile` does (the tile itself excluded), through the
product's own ``histcode.features.search.TileSearcher`` (hits with every column but the vector and the
per-slide size, which ``with_sizes`` adds once per slide); recall@k is against exact cosine search over all rows.
After each index is built its partitions are read once (``prewarm_index``) and every query is run once
untimed, so the figures are those of a warm server, not of the first query after a start. The table gets the
indices the product gives it: the id indices over all rows (as ``maintain_tables``' optimize leaves them) and,
with each vector index, the filter indices of ``features.upkeep.filter_indices``. Also measured: exact search
(a flat Lance scan, no index), filtered search (``--where`` style: half the rows by patient, and ten slides by
id) with its own exact truth, the path ``TileSearcher`` chooses beside each of the others forced (exact,
prefilter, postfilter; on ``--strategy-queries`` queries), and the paper pipeline's way (one feature file per
slide, every file loaded and scored per query). ``--vectors real`` samples from ``benchmarks/_vectors.py``'s
model of the demo's embeddings (its fit is printed beside the real vectors' own search hardness); its default
``--dim`` is 256, the default encoder's (512 for the others).

The choice: among index x query settings whose recall@k reaches ``--target-recall``, the fastest p50; if none
does, the best recall within ``--target-ms`` (said so). ``--write-params`` writes it to that params.yaml's
``features`` section. Index grid entries are TYPE:SCALE[:DIMS] with partitions = SCALE x sqrt(n) and, for
IVF_PQ, DIMS dimensions per one-byte sub-vector code. Files go to a temporary directory (several GB at 1M).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._vectors import STATS, clustered, fit_statistics, from_statistics, hardness, load_statistics, real_vectors  # noqa: E402


@dataclass
class Trial:
    index: str
    nprobes: int | None
    refine: int | None
    ef: int | None
    p50: float
    p99: float
    recall: float

    @property
    def label(self) -> str:
        if self.nprobes is None:
            return self.index
        ef = f", ef {self.ef}" if self.ef else ""
        return f"{self.index} nprobes {self.nprobes}, refine {self.refine or 'none'}{ef}"


def percentiles(times: list[float]) -> tuple[float, float]:
    ms = np.asarray(times) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def exact_neighbours(unit: np.ndarray, query: int, k: int, allowed: np.ndarray | None = None) -> set[int]:
    scores = unit @ unit[query]
    scores[query] = -np.inf
    if allowed is not None:
        scores[~allowed] = -np.inf
    top = np.argpartition(-scores, k)[:k]
    return set(top.tolist())


def ids_of(hits) -> list[int]:
    """Row numbers of the hits, in rank order."""
    return [int(t[1:]) for t in hits.column("tile_id").to_pylist()]


def run_queries(table, data: np.ndarray, queries: np.ndarray, truth: list[set[int]], k: int, cfg, where=None,
                warm: bool = True, exclude_by_filter: bool = False, strategy=None) -> tuple[float, float, float]:
    """p50 ms, p99 ms, recall@k of the product's ``TileSearcher`` as ``histcode search --tile`` and the viewer
    call it (the query tile itself excluded: ``exclude``), after an untimed pass. ``exclude_by_filter``: the
    query tile excluded by a ``tile_id !=`` filter instead, as before (for the comparison); ``strategy``: a
    filtered search's path forced."""
    from histcode.features.search import TileSearcher

    searcher = TileSearcher(table, cfg)

    def ask(q: int):
        if exclude_by_filter:
            own = f"tile_id != 't{q}'"
            return searcher.nearest(data[q], k, f"({where}) AND {own}" if where else own)
        return searcher.nearest(data[q], k, where, exclude=f"t{q}", strategy=strategy)

    if warm:
        for q in queries:
            ask(q)
    times, recalls = [], []
    for q, want in zip(queries, truth):
        t0 = time.perf_counter()
        hits = ask(q)
        times.append(time.perf_counter() - t0)
        got = [i for i in ids_of(hits) if i != q][:k]
        recalls.append(len(want & set(got)) / k)
    p50, p99 = percentiles(times)
    return p50, p99, float(np.mean(recalls))


def parse_grid(entries: list[str]) -> list[tuple[str, float, int]]:
    out = []
    for entry in entries:
        m = re.fullmatch(r"(IVF_PQ|IVF_HNSW_SQ|IVF_HNSW_FLAT|IVF_FLAT):([0-9.]+)(?::(\d+))?", entry)
        if not m:
            raise SystemExit(f"--grid entry {entry!r}: expected TYPE:SCALE[:DIMS], e.g. IVF_PQ:1:16 or IVF_HNSW_SQ:0.25")
        out.append((m[1], float(m[2]), int(m[3] or 16)))
    return out


def write_params(path: Path, best: dict) -> None:
    """Set the chosen keys in the ``features`` section of a params.yaml, keeping its comments where they were."""
    lines = path.read_text().splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("features:")), None)
    if start is None:
        raise SystemExit(f"{path}: no features section")
    for key, value in best.items():
        rendered = "null" if value is None else str(value)
        for i in range(start + 1, len(lines)):
            if lines[i].strip() and not lines[i].startswith(" "):
                raise SystemExit(f"{path}: no features.{key} to write")
            m = re.match(rf"^(  {key}:[ ]*)(\S+)([ ]*)(#.*)?$", lines[i].rstrip("\n"))
            if m:
                body = f"{m[1]}{rendered}"
                comment = m[4] or ""
                width = len(m[1]) + len(m[2]) + len(m[3])
                lines[i] = (body.ljust(width) if comment else body) + comment + "\n"
                break
        else:
            raise SystemExit(f"{path}: no features.{key} to write")
    path.write_text("".join(lines))


def make_vectors(args, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    if args.vectors == "real":
        stats = load_statistics(args.stats or STATS.get(args.dim, STATS[512]))
        dim = stats["centres"].shape[1]
        sample = from_statistics(np.random.default_rng(1), stats, int(stats["real_n"]))
        lid, contrast = hardness(sample)
        shape = (f"drawn from real embeddings' statistics ({dim}-d; at the real sample's n={int(stats['real_n'])}: "
                 f"LID {lid:.1f} vs real {float(stats['real_lid']):.1f}, relative contrast {contrast:.2f} vs real "
                 f"{float(stats['real_contrast']):.2f})")
        return from_statistics(rng, stats, args.n), shape
    clusters = args.clusters if args.vectors == "clustered" else 0
    shape = f"{clusters} Gaussian clusters" if clusters else "isotropic Gaussian"
    return clustered(rng, args.n, args.dim, clusters), shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, help="default 512; real: 256 (the default encoder's), the model's")
    parser.add_argument("--vectors", choices=["clustered", "isotropic", "real"], default="clustered")
    parser.add_argument("--stats", type=Path, help="real: the model (.npz) to draw from (default by --dim)")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--tiles-per-slide", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--grid", nargs="+", default=["IVF_HNSW_SQ:0.064"], help="default: the shipped index")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[6, 8])
    parser.add_argument("--refine", type=int, nargs="+", default=[2], help="0 = no re-ranking")
    parser.add_argument("--ef", type=int, nargs="+", default=[100], help="IVF_HNSW_SQ; 0 = Lance's default")
    parser.add_argument("--strategy-queries", type=int, default=20, help="queries per forced filtered-search path")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--target-ms", type=float, default=10.0)
    parser.add_argument("--write-params", type=Path, help="write the chosen settings into this params.yaml")
    parser.add_argument("--no-files", action="store_true", help="skip the one-file-per-slide comparison")
    parser.add_argument("--fit-from", type=Path, help="fit a real-statistics model to this workspace or table")
    parser.add_argument("--out", type=Path, help="with --fit-from: where to save the model")
    args = parser.parse_args()
    if args.dim is None:
        args.dim = 256 if args.vectors == "real" else 512

    if args.fit_from:
        real = real_vectors(args.fit_from)
        stats = fit_statistics(real)
        out = args.out or STATS.get(real.shape[1], Path(f"stats_{real.shape[1]}d.npz"))
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, **stats)
        print(f"{len(real)} x {real.shape[1]} real vectors: LID {float(stats['real_lid']):.1f}, relative contrast "
              f"{float(stats['real_contrast']):.2f}; model saved to {out}")
        return

    from histcode.config import FeaturesConfig
    from histcode.features.upkeep import filter_indices, index_config
    from histcode.store.vectors import TILE_KIND, TableSpec, connect, open_table, to_batch

    rng = np.random.default_rng(0)
    n, k = args.n, args.k
    data, shape = make_vectors(args, rng)
    dim = data.shape[1]
    print(f"{n} x {dim} float32 vectors, {shape}; {n // args.tiles_per_slide} slides of {args.tiles_per_slide} "
          f"tiles; {args.queries} query tiles, k={k}", flush=True)
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    queries = rng.choice(n, args.queries, replace=False)
    truth = [exact_neighbours(unit, q, k) for q in queries]
    slide_of = np.arange(n) // args.tiles_per_slide
    half = slide_of % 2 == 0  # patient 'p0'
    few = np.isin(slide_of, np.arange(10))
    filters = {"patient_id = 'p0' (half the rows)": ("patient_id = 'p0'", half),
               "slide_id IN (10 slides)": ("slide_id IN (" + ", ".join(f"'s{i}'" for i in range(10)) + ")", few)}
    trials: list[Trial] = []
    filtered: dict[str, tuple] = {}
    with tempfile.TemporaryDirectory(prefix="histcode-search-") as tmp:
        root = Path(tmp)
        spec = TableSpec("fv-bench", TILE_KIND, dim, "synthetic")
        table = open_table(connect(root / "lance"), spec)
        t0 = time.perf_counter()
        for start in range(0, n, 100_000):
            stop = min(n, start + 100_000)
            slides = [f"s{s}" for s in slide_of[start:stop]]
            within = np.arange(start, stop) % args.tiles_per_slide  # a slide's tiles on a 40-column grid
            table.add(to_batch(spec, {"tile_id": [f"t{i}" for i in range(start, stop)], "slide_id": slides,
                                      "patient_id": [f"p{s % 2}" for s in slide_of[start:stop]],
                                      "x": (within % 40) * 256, "y": (within // 40) * 256,
                                      "size": [256] * (stop - start), "vector": data[start:stop]}))
        write_s = time.perf_counter() - t0
        from lancedb.index import BTree
        for column in spec.indexed_columns:  # over every row, as maintain_tables' optimize leaves them
            table.create_index(column, config=BTree(), replace=True)
        print(f"wrote {n} vectors to Lance in {write_s:.1f} s, id indices over them", flush=True)

        # exact: a flat scan of the Lance table, before any index exists
        exact_cfg = FeaturesConfig()
        few_q = queries[: min(10, len(queries))]
        p50, p99, recall = run_queries(table, data, few_q, truth[:len(few_q)], k, exact_cfg, warm=False)
        trials.append(Trial("exact (flat scan, no index)", None, None, None, p50, p99, recall))

        builds = {}
        for kind, scale, dims in parse_grid(args.grid):
            name = f"{kind} {round(scale * np.sqrt(n))} partitions" + (f", {dim // dims} codes" if kind == "IVF_PQ" else "")
            base = FeaturesConfig(index_type=kind, index_partition_scale=scale, index_subvector_dims=dims)
            t0 = time.perf_counter()
            table.create_index("vector", config=index_config(base, n, dim), replace=True)
            builds[name] = time.perf_counter() - t0
            table.to_lance().prewarm_index("vector_idx")
            made = filter_indices(table)
            print(f"{name}: built in {builds[name]:.0f} s; filter indices on {', '.join(made) or 'none new'}", flush=True)
            efs = args.ef if kind.startswith("IVF_HNSW") else [0]
            for nprobes in args.nprobes:
                for refine in args.refine:
                    for ef in efs:
                        cfg = base.model_copy(update={"nprobes": nprobes, "refine_factor": refine or None,
                                                      "hnsw_ef": ef or None})
                        p50, p99, recall = run_queries(table, data, queries, truth, k, cfg)
                        trial = Trial(name, nprobes, refine or None, ef or None, p50, p99, recall)
                        trials.append(trial)
                        print(f"  {trial.label}: p50 {p50:.1f} ms, p99 {p99:.1f} ms, recall@{k} {recall:.3f}", flush=True)
            best_here = choose([t for t in trials if t.index == name], args.target_recall, args.target_ms)
            if best_here is not None:
                cfg = base.model_copy(update={"nprobes": best_here.nprobes, "refine_factor": best_here.refine,
                                              "hnsw_ef": best_here.ef})
                from histcode.features.search import TileSearcher
                for label, (where, allowed) in filters.items():
                    want = [exact_neighbours(unit, q, k, allowed) for q in queries]
                    chosen = TileSearcher(table, cfg).strategy(where)
                    filtered[(name, f"{label}, {chosen} (chosen)")] = run_queries(table, data, queries, want, k, cfg,
                                                                                  where=where)
                    print(f"  {label}: {chosen} (chosen): p50 {filtered[(name, f'{label}, {chosen} (chosen)')][0]:.1f} ms",
                          flush=True)
                    few_q = queries[:args.strategy_queries]
                    for forced in ("exact", "prefilter", "postfilter"):
                        if forced != chosen:
                            filtered[(name, f"{label}, {forced} (forced, {len(few_q)} queries)")] = run_queries(
                                table, data, few_q, want[:len(few_q)], k, cfg, where=where, strategy=forced)
                filtered[(name, "query tile excluded by a tile_id != filter (before)")] = run_queries(
                    table, data, queries, truth, k, cfg, exclude_by_filter=True)

        scan = None
        if not args.no_files:  # the paper pipeline's storage: one feature file per slide, all scanned per query
            files = root / "per_slide"
            files.mkdir()
            for s, start in enumerate(range(0, n, args.tiles_per_slide)):
                np.save(files / f"s{s}.npy", data[start:start + args.tiles_per_slide])
            paths = sorted(files.glob("*.npy"))
            times = []
            for q in queries[:5]:
                t0 = time.perf_counter()
                qn = unit[q]
                best = np.full(k, -np.inf)
                for path in paths:
                    feats = np.load(path)
                    scores = (feats / np.linalg.norm(feats, axis=1, keepdims=True)) @ qn
                    best = np.sort(np.concatenate([best, np.partition(scores, -k)[-k:] if len(scores) > k else scores]))[-k:]
                times.append(time.perf_counter() - t0)
            scan = percentiles(times)

    print(f"\n{n} x {dim}, {shape}")
    for name, seconds in builds.items():
        print(f"index build: {name}: {seconds:.0f} s")
    print(f"{'search (k=' + str(k) + ', warm)':<62}{'p50 ms':>8}{'p99 ms':>8}{'recall':>8}")
    for t in trials:
        print(f"{t.label:<62}{t.p50:>8.1f}{t.p99:>8.1f}{t.recall:>8.3f}")
    if scan:
        print(f"{'one file per slide, all scanned':<62}{scan[0]:>8.1f}{scan[1]:>8.1f}{1.0:>8.3f}")
    best = choose([t for t in trials if t.nprobes is not None], args.target_recall, args.target_ms)
    if best is None:
        print("no index setting ran")
        return
    met = best.recall >= args.target_recall and best.p50 <= args.target_ms
    print(f"\nchosen: {best.label}: p50 {best.p50:.1f} ms, recall@{k} {best.recall:.3f} "
          f"({'meets' if met else 'does NOT meet'} p50 <= {args.target_ms:g} ms at recall >= {args.target_recall:g})")
    exact = trials[0]
    print(f"ratios (p50): exact scan : chosen ANN = {exact.p50 / best.p50:.1f} : 1"
          + (f"; per-slide files : chosen ANN = {scan[0] / best.p50:.0f} : 1" if scan else ""))
    for (name, label), (p50, p99, recall) in filtered.items():
        if name == best.index:
            print(f"filtered, {label}: p50 {p50:.1f} ms, p99 {p99:.1f} ms, recall@{k} {recall:.3f}")
    for label in filters:
        p50, _, recall = next(v for (name, lab), v in filtered.items() if name == best.index and
                              lab.startswith(label) and lab.endswith("(chosen)"))
        print(f"ratio (p50) filtered {label} : unfiltered = {p50 / best.p50:.1f} : 1")
    if args.write_params:
        kind, scale, dims = next(g for g in parse_grid(args.grid)
                                 if best.index.startswith(f"{g[0]} {round(g[1] * np.sqrt(n))} partitions"))
        write_params(args.write_params, {"index_type": kind, "index_partition_scale": scale,
                                         "index_subvector_dims": dims, "nprobes": best.nprobes,
                                         "refine_factor": best.refine, "hnsw_ef": best.ef})
        print(f"written to {args.write_params}: features.index_type {kind}, index_partition_scale {scale}, "
              f"index_subvector_dims {dims}, nprobes {best.nprobes}, refine_factor {best.refine}, hnsw_ef {best.ef}")


def choose(trials: list[Trial], target_recall: float, target_ms: float) -> Trial | None:
    """The fastest setting that reaches the recall target; else the best recall within the time target; else
    the best recall."""
    if not trials:
        return None
    good = [t for t in trials if t.recall >= target_recall]
    if good:
        return min(good, key=lambda t: t.p50)
    quick = [t for t in trials if t.p50 <= target_ms]
    return max(quick or trials, key=lambda t: (t.recall, -t.p50))


if __name__ == "__main__":
    main()
