"""The prepared device check (benchmarks/gpu.py) runs end to end without a GPU: its --quick mode on the CPU takes
every stage through the product's code, so a lent device runs a script that is known to work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_stage_on_the_cpu(tiled_workspace, tmp_path) -> None:
    figures = tmp_path / "gpu.json"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--device", "cpu",
                           "--workspace", str(tiled_workspace.root), "--json", str(figures)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = json.loads(figures.read_text())
    for stage in ("tissue", "reader", "materialise", "pretrain", "heads"):
        assert stage in out and "error" not in out[stage], (stage, out.get(stage))
    assert out["tissue"]["identical_masks"] == out["tissue"]["slides"] > 0  # the same code path on one device
    assert out["materialise"]["tiles"] > 0 and out["materialise"]["ratio_to_bare"] > 0
    assert out["pretrain"]["ratio_to_bare"] > 0 and out["heads"]["ratio_to_bare"] > 0
    for line in ("tissue detection:", "parallel reader alone:", "materialisation (", "pretraining step (AdCo",
                 "heads training (CLAM_SB"):
        assert line in done.stdout, done.stdout[-3000:]
