"""Faults injected at random points of ingest, tile, embed and labels, each followed by a plain rerun: does the
rerun leave exactly what an uninterrupted run leaves?

    python benchmarks/faults.py [--faults 8] [--seed 0] [--patients 3] [--keep DIR]

A small demo cohort is run once without interruption, stage by stage (`histcode ingest`, `tile`, `pretrain`,
`embed`, `labels ingest`, each a process of its own), and the workspace is kept after each stage. Then, for each
fault, the workspace as it was before a stage is copied and the stage is run with a fault at a random point
(``HISTCODE_FAILPOINT``, ``histcode.runtime.failpoint``): a kill (SIGKILL: a power cut, the OOM killer) or a
full disk (``OSError(ENOSPC)`` raised there), at a random pass of the point (``@n``: the n-th slide, the n-th
catalog commit). A kill must end the process with -9, a full disk with exit status 4 and the machine's fault
named (no traceback); meanwhile `histcode sql` must serve only vectors the ledger records. The stage is then
rerun as it is (no option) and must leave the catalog rows (slides, tilings, tiles, ledger, label tables) and
the Lance tables' row ids and vectors exactly as the uninterrupted run left them. It prints each fault, then
"N faults injected, N survived".
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

# The points each stage passes, how often at most a fault waits (``@n``), and the modes that make sense there.
POINTS: dict[str, list[tuple[str, int, tuple[str, ...]]]] = {
    "ingest": [("ingest.slide", 6, ("kill", "enospc")), ("ingest.committed", 6, ("kill",)),
               ("catalog.commit", 8, ("kill", "enospc"))],
    "tile": [("tiling.slide", 6, ("kill", "enospc")), ("tiling.committed", 6, ("kill",)),
             ("catalog.commit", 8, ("kill", "enospc"))],
    "embed": [("embed.tiles_written", 3, ("kill", "enospc")), ("embed.committed", 3, ("kill", "enospc")),
              ("catalog.commit", 6, ("kill", "enospc"))],
    "labels": [("labels.frames", 1, ("kill", "enospc")), ("catalog.commit", 2, ("kill", "enospc"))],
}
STAGES = ("ingest", "tile", "pretrain", "embed", "labels")
FAULTED = ("ingest", "tile", "embed", "labels")
PARAMS = {"tiling": {"workers": 1}, "features": {"commit_every_slides": 2, "batch_size": 8, "num_workers": 0},
          "pretrain": {"image_px": 32, "batch_size": 8, "max_steps": 1, "bank_size": 16, "probe": {"enabled": False}}}
KILLED = -9
MACHINE_FAULT = 4  # the exit status of a command a fault of the machine stopped (histcode.cli.common.told_error)


@dataclass
class Fault:
    stage: str
    point: str
    mode: str
    nth: int
    injected: bool = False
    survived: bool = False
    note: str = ""

    @property
    def spec(self) -> str:
        return f"{self.point}{':enospc' if self.mode == 'enospc' else ''}@{self.nth}"


def stage_args(stage: str, cohort_dir: Path) -> list[str]:
    return {"ingest": ["ingest", "--manifest", str(cohort_dir / "manifest.csv")], "tile": ["tile"],
            "pretrain": ["pretrain"], "embed": ["embed"],
            "labels": ["labels", "ingest", str(cohort_dir / "expression.tsv")]}[stage]


def histcode(ws: Path, args: list[str], failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("HISTCODE_FAILPOINT", None)
    if failpoint:
        env["HISTCODE_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "histcode", "--workspace", str(ws), *args], env=env,
                          capture_output=True, text=True, timeout=900)


def state(ws: Path) -> dict:
    """What a run leaves, without times and versions: the catalog's rows and the Lance tables' rows."""
    import lancedb

    from histcode.store.catalog import Catalog
    from histcode.workspace import Workspace

    workspace = Workspace(ws)
    queries = {
        "slides": "SELECT slide_id, status, reason, content_hash, cohort, path FROM slides",
        "tilings": "SELECT slide_id, spec_id, status, reason, content_hash, n_tiles FROM tilings",
        "tiles": "SELECT tile_id, slide_id, spec_id, x, y, size FROM tiles",
        "ledger": "SELECT view_id, slide_id, content_hash, rows, status FROM materializations",
        "label_sets": "SELECT label_version, is_current, gate_status, n_samples, n_genes, n_patients FROM label_sets",
        "de_labels": "SELECT * FROM de_labels", "slide_labels": "SELECT * FROM slide_labels",
        "cv_folds": "SELECT * FROM cv_folds", "gene_gate": "SELECT * FROM gene_gate",
    }
    catalog = Catalog.of(workspace)
    out: dict = {name: sorted(map(repr, (tuple(r.values()) for r in catalog.query(sql)))) for name, sql in queries.items()}
    if workspace.lancedb_dir.exists():
        db = lancedb.connect(str(workspace.lancedb_dir))
        for name in sorted(getattr(db.list_tables(), "tables", db.list_tables())):
            data = db.open_table(name).to_arrow()
            key = "tile_id" if "tile_id" in data.column_names else "slide_id"
            data = data.sort_by(key)
            out[f"lance {name}"] = (data.column(key).to_pylist(),
                                    np.asarray(data.column("vector").to_pylist(), dtype=np.float32))
    return out


def differences(a: dict, b: dict) -> list[str]:
    found = [f"{k}: only in one" for k in sorted(set(a) ^ set(b))]
    for key in sorted(set(a) & set(b)):
        if key.startswith("lance "):
            (ids_a, vec_a), (ids_b, vec_b) = a[key], b[key]
            if ids_a != ids_b:
                found.append(f"{key}: {len(ids_a)} vs {len(ids_b)} rows, ids differ")
            elif not np.allclose(vec_a, vec_b, atol=1e-5):
                found.append(f"{key}: vectors differ")
        elif a[key] != b[key]:
            found.append(f"{key}: {len(a[key])} vs {len(b[key])} rows differ")
    return found


def served_as_ledger(ws: Path) -> str | None:
    """None when `histcode sql` serves exactly the vectors the ledger records, else what differs."""
    from histcode.store.catalog import Catalog
    from histcode.store.sql import run_sql
    from histcode.workspace import Workspace

    workspace = Workspace(ws)
    views = Catalog.of(workspace).query("SELECT DISTINCT view_id, lance_table FROM feature_views "
                                        "WHERE kind = 'tile' AND status IN ('ok', 'partial')")
    for view in views:
        ledger = Catalog.of(workspace).query("SELECT coalesce(sum(rows), 0) AS n FROM materializations "
                                             "WHERE view_id = ? AND status = 'ok'", [view["view_id"]])[0]["n"]
        try:
            served = run_sql(workspace, f'SELECT count(*) AS n FROM "{view["lance_table"]}"').column("n")[0].as_py()
        except Exception as exc:  # noqa: BLE001 -- a table the ledger needs and cannot be read: that is the finding
            return f"{view['lance_table']}: {exc}"
        if served != ledger:
            return f"{view['lance_table']}: SQL serves {served} vectors, the ledger records {ledger}"
    return None


def reference_run(root: Path, cohort_dir: Path) -> dict[str, Path]:
    """The uninterrupted run, the workspace kept before and after every stage: {'before <stage>': path, ...}."""
    ws = root / "reference"
    ws.mkdir(parents=True)
    (ws / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    snapshots = {}
    for stage in STAGES:
        snapshots[f"before {stage}"] = root / f"before-{stage}"
        shutil.copytree(ws, snapshots[f"before {stage}"])
        done = histcode(ws, stage_args(stage, cohort_dir))
        if done.returncode != 0:
            raise SystemExit(f"the uninterrupted {stage} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        print(f"reference: {stage} done", flush=True)
    snapshots["after"] = ws
    for stage, after in zip(STAGES, STAGES[1:] + ("",)):
        snapshots[f"after {stage}"] = snapshots[f"before {after}"] if after else ws
    return snapshots


def inject(fault: Fault, snapshots: dict[str, Path], cohort_dir: Path, root: Path, index: int) -> Fault:
    ws = root / f"fault-{index}"
    shutil.copytree(snapshots[f"before {fault.stage}"], ws)
    args = stage_args(fault.stage, cohort_dir)
    hit = histcode(ws, args, fault.spec)
    if fault.mode == "kill":
        fault.injected = hit.returncode == KILLED
    else:
        fault.injected = hit.returncode == MACHINE_FAULT
        if fault.injected and ("no space left on device" not in hit.stderr or "Traceback" in hit.stderr):
            fault.note = "the full disk was not told in one line: " + hit.stderr.strip()[-300:]
            shutil.rmtree(ws, ignore_errors=True)
            return fault
    if not fault.injected:
        fault.note = f"not reached (exit {hit.returncode})"
        shutil.rmtree(ws, ignore_errors=True)
        return fault
    problem = served_as_ledger(ws)
    rerun = histcode(ws, args)
    diff = differences(state(ws), state(snapshots[f"after {fault.stage}"]))
    fault.survived = rerun.returncode == 0 and not diff and problem is None
    fault.note = problem or (f"rerun exit {rerun.returncode}: {rerun.stderr.strip()[-300:]}" if rerun.returncode
                             else "; ".join(diff) or "rerun equals the uninterrupted run")
    shutil.rmtree(ws, ignore_errors=True)
    return fault


def draw(rng: random.Random, stage: str) -> Fault:
    point, most, modes = rng.choice(POINTS[stage])
    return Fault(stage, point, rng.choice(modes), rng.randint(1, most))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=8, help="faults to inject (stages taken in turn)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patients", type=int, default=3, help="patients of the demo cohort (2-3 slides each)")
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    os.environ.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false",
                       "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"})
    from histcode.config import DemoConfig
    from histcode.demo.build import build_demo_cohort

    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="histcode-faults-")
    root = Path(args.keep or tmp.name).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        demo = DemoConfig(n_patients=max(2, args.patients), canvas_cells=(6, 8), fraction_40x=0.3,
                          fraction_generic_tiff=0.3)
        cohort = build_demo_cohort(demo, root / "demo", progress=False)
        print(f"demo cohort: {cohort.n_patients} patients, {cohort.n_slides} slides", flush=True)
        snapshots = reference_run(root / "runs", cohort.out_dir)
        rng = random.Random(args.seed)
        faults: list[Fault] = []
        attempts = 0
        while len(faults) < args.faults and attempts < 4 * args.faults:
            stage = FAULTED[len(faults) % len(FAULTED)]
            fault = inject(draw(rng, stage), snapshots, cohort.out_dir, root / "runs", attempts)
            attempts += 1
            print(f"{fault.stage:7s} {fault.spec:32s} {'injected' if fault.injected else 'missed':9s}"
                  f"{'survived' if fault.survived else ('FAILED' if fault.injected else ''):9s} {fault.note}", flush=True)
            if fault.injected:
                faults.append(fault)
        survived = sum(f.survived for f in faults)
        print(f"{len(faults)} faults injected, {survived} survived")
        if survived < len(faults):
            sys.exit(1)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
