"""The Python API against the command line, and streamed reads against whole ones, on a copy of a workspace whose
default view is padded with synthetic tiles to ``--rows`` (vectors drawn around the real ones, same schema).

    python benchmarks/api.py [--workspace DIR] [--rows 500000] [--queries 30]

Measured, in one run on this machine:
- ``import histcode`` (the lazy façade) against ``import histcode.api`` (the stores, MLflow, pandas), fresh
  interpreters, median of 3;
- reading the whole tile table (``view.tiles``) as Arrow, pandas and polars, and streaming it in 65,536-row
  batches (``view.iter_tiles``), each in a fresh process with its peak resident memory;
- one tile query answered in a warm Python session (``view.nearest``, p50 over ``--queries``) against a
  ``histcode search --tile`` process per query (p50 of 3), and the same for a SQL count (``ws.sql`` against
  ``histcode sql``);
- building the tumour task's bags (``view.bags``) on the real slides.

The workspace (default: this checkout's demo workspace, made by ``make demo``) is copied to a temporary folder
first; nothing of it is written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

READER = """
import json, resource, sys, time
import histcode
view = histcode.open(sys.argv[1]).view()
next(iter(view.iter_tiles(batch_size=1, columns=["tile_id"], format="arrow")))  # the table opened and read once
opened_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
mode = sys.argv[2]
start = time.perf_counter()
if mode == "stream":
    rows = sum(len(batch) for batch in view.iter_tiles(format="arrow", batch_size=65536))
else:
    table = view.tiles(format=mode)
    rows = len(table)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rows": rows, "seconds": seconds, "peak_mb": peak, "read_mb": peak - opened_mb}))
"""


def _copy(source: Path, target: Path) -> Path:
    for name in ("params.yaml", "data/catalog.duckdb", "data/lancedb", "mlruns"):
        src = source / name
        if not src.exists():
            continue
        dst = target / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    return target


def _pad(ws_root: Path, rows: int) -> int:
    """Append synthetic tiles to the default view's tile table until it holds ``rows`` (vectors: real ones plus
    noise of their own spread, ids that cannot clash); returns the rows it holds."""
    import numpy as np
    import pyarrow as pa

    import histcode
    from histcode.features.read import view_table
    from histcode.store.vectors import TILE_KIND

    view = histcode.open(ws_root).view()
    table = view_table(view._paths, view._view, TILE_KIND)
    have = table.count_rows()
    if rows <= have:
        return have
    real = table.to_arrow()
    vectors = np.stack(real.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    spread = vectors.std(axis=0, keepdims=True)
    rng = np.random.default_rng(0)
    chunk = 100_000
    added = 0
    while have + added < rows:
        n = min(chunk, rows - have - added)
        pick = rng.integers(0, len(real), n)
        base = real.take(pa.array(pick))
        noisy = vectors[pick] + 0.25 * spread * rng.standard_normal((n, vectors.shape[1]), dtype=np.float32)
        columns = {name: base.column(name) for name in base.column_names}
        columns["tile_id"] = pa.array([f"synthetic-{added + i:09d}" for i in range(n)], pa.string())
        columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(noisy.ravel()), vectors.shape[1])
        table.add(pa.table(columns, schema=real.schema))
        added += n
    return have + added


def _median_run(argv: list[str], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", type=Path, default=ROOT)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--queries", type=int, default=30)
    args = parser.parse_args()

    import histcode

    histcode.open(args.workspace).view()  # fails early, with the reason, on a workspace without a view
    python = sys.executable
    histcode_cli = [python, "-m", "histcode"]
    with tempfile.TemporaryDirectory(prefix="histcode-api-bench-") as tmp:
        root = _copy(args.workspace, Path(tmp) / "ws")
        real_rows = histcode.open(root).view().tiles(columns=["tile_id"], format="arrow").num_rows
        t0 = time.perf_counter()
        # padded in a process of its own: its writes done and closed before anything is measured
        pad = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
               f"from benchmarks.api import _pad; print(_pad(Path({str(root)!r}), {args.rows}))")
        rows = int(subprocess.run([python, "-c", pad], check=True, capture_output=True, text=True).stdout.split()[-1])
        print(f"workspace copy {root}: {real_rows} real tiles, padded to {rows} in {time.perf_counter() - t0:.1f} s")

        lazy = _median_run([python, "-c", "import histcode"])
        full = _median_run([python, "-c", "import histcode.api"])
        print(f"import histcode {lazy:.2f} s : import histcode.api {full:.2f} s = 1 : {full / lazy:.1f}")

        reads = {}
        for mode in ("arrow", "pandas", "polars", "stream"):
            out = subprocess.run([python, "-c", READER, str(root), mode], check=True, capture_output=True, text=True)
            reads[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        base = reads["arrow"]
        dim = histcode.open(root).view().dim
        print(f"read {rows} tiles x {dim}-d ({rows * dim * 4 / 2**20:.0f} MB of vectors), whole or streamed, a fresh "
              "process each; memory: peak resident growth over the process with the table opened")
        for mode, r in reads.items():
            print(f"  {mode:7s} {r['seconds']:6.2f} s ({r['rows'] / r['seconds'] / 1e6:.2f} M rows/s), resident "
                  f"+{r['read_mb']:4.0f} MB; {r['seconds'] / base['seconds']:.2f}x the "
                  f"time, {r['read_mb'] / base['read_mb']:.2f}x the resident growth of arrow")

        ws = histcode.open(root)
        view = ws.view()
        ids = view.tiles(columns=["tile_id"], format="arrow").column("tile_id").to_pylist()[:args.queries]
        view.nearest(tile_id=ids[0], k=10)  # warm: the first query opens the table
        times = []
        for tile_id in ids:
            start = time.perf_counter()
            view.nearest(tile_id=tile_id, k=10)
            times.append(time.perf_counter() - start)
        api_ms = statistics.median(times) * 1000
        cli_s = _median_run(histcode_cli + ["-w", str(root), "search", "--tile", ids[0], "--k", "10", "--format", "csv"])
        print(f"one tile query (k 10, {rows} tiles, no index): API p50 {api_ms:.1f} ms : a CLI process {cli_s * 1000:.0f} ms "
              f"= 1 : {cli_s * 1000 / api_ms:.0f}")
        query = "SELECT count(*) AS n FROM tile_embeddings"
        ws.sql(query)
        start = time.perf_counter()
        for _ in range(5):
            ws.sql(query)
        sql_ms = (time.perf_counter() - start) / 5 * 1000
        cli_sql = _median_run(histcode_cli + ["-w", str(root), "sql", query, "--format", "csv"])
        print(f"SQL count: ws.sql {sql_ms:.1f} ms : a `histcode sql` process {cli_sql * 1000:.0f} ms = 1 : "
              f"{cli_sql * 1000 / sql_ms:.0f}")

        if ws.labels() is not None and ws.labels().passed:
            start = time.perf_counter()
            bags = view.bags("tumor")
            seconds = time.perf_counter() - start
            tiles = int(bags.frame().n_tiles.sum())
            print(f"view.bags('tumor'): {len(bags)} slides, {tiles} tiles memory-mapped, in {seconds:.2f} s")


if __name__ == "__main__":
    main()
