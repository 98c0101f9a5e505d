"""What the shared set-up costs: the whole pipeline on one small cohort, embedded (SQLite MLflow, local Lance,
Prefect's temporary API, threads) against the same configuration through the local stack (`histcode services`:
a Prefect deployment on a server on PostgreSQL, MLflow server on PostgreSQL with artifacts on S3, Lance on S3,
tiling and materialisation over a Dask scheduler with two workers), one after the other in one run; and the
stack's start-up.

    python benchmarks/services.py [--patients 4] [--steps 1]

Prints both wall times and their ratio; both runs must give the same vectors (checked, bit for bit).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

for _key, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(_key, _value)


def _workspace(root: Path, patients: int, steps: int):
    from histcode.workspace import Workspace

    ws = Workspace(root).ensure()
    params = {"demo": {"n_patients": patients, "canvas_cells": [6, 8], "matched_normal_fraction": 0.75},
              "pretrain": {"image_px": 32, "batch_size": 8, "max_steps": steps, "bank_size": 16,
                           "probe": {"enabled": False}},
              "labels": {"min_class_size": 1, "folds": 2},
              "heads": {"epochs": 5, "patience": 8, "bootstrap": 20, "aggregators": ["attention", "mean"]}}
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
    return ws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()

    import numpy as np
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from histcode.features.read import tile_features
    from histcode.services.stack import Stack

    with tempfile.TemporaryDirectory(prefix="histcode-bench-services-") as tmp:
        root = Path(tmp)
        stack = Stack(root / "stack", repo=REPO)
        try:
            start = time.perf_counter()
            stack.up()
            up_s = time.perf_counter() - start
            stack_vars = set(stack.environment()) | {"PREFECT_API_URL", "PREFECT_HOME"}
            embedded_env = {k: v for k, v in os.environ.items() if k not in stack_vars}

            local = _workspace(root / "embedded", args.patients, args.steps)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "flows.pipeline", "--workspace", str(local.root)], env=embedded_env,
                           cwd=REPO, check=True, capture_output=True)
            embedded_s = time.perf_counter() - start

            shared = _workspace(root / "shared", args.patients, args.steps)
            os.environ.update(stack.environment())
            start = time.perf_counter()
            with temporary_settings({PREFECT_API_URL: stack.urls()["prefect"]}):
                run = run_deployment("histcode-pipeline/demo", parameters={"workspace": str(shared.root)},
                                     timeout=3600)
            shared_s = time.perf_counter() - start
            if not run.state.is_completed():
                raise SystemExit(f"the deployment run ended {run.state}; see {stack.logs / 'prefect-worker.log'}")
            remote = tile_features(shared, fmt="pandas").sort_values("tile_id")
            for key in stack_vars:
                os.environ.pop(key, None)
            ours = tile_features(local, fmt="pandas").sort_values("tile_id")
            same = len(remote) == len(ours) and np.array_equal(np.stack(remote.vector), np.stack(ours.vector))
        finally:
            stack.down(remove=True)

    print(f"stack up (PostgreSQL, S3, MLflow, Prefect + worker, Dask + 2 workers): {up_s:.1f} s")
    print(f"pipeline, {len(ours)} tiles: embedded {embedded_s:.1f} s : shared services {shared_s:.1f} s "
          f"= 1 : {shared_s / embedded_s:.2f}; vectors bit for bit equal: {same}")


if __name__ == "__main__":
    main()
