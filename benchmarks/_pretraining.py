"""Shared by the pretraining benchmarks (ssl_gain, ssl_sweep): one pretraining run of given settings on the demo
workspace's tiles, through the same ``pretrain`` the pipeline calls (an MLflow run in experiment ``pretrain``, a
registered encoder version, its probe), and the probe's figures summarised over seeds."""

from __future__ import annotations

import math
import time

import numpy as np

TASKS = ("tissue", "tumour", "subtype")
SETS = (("", "as is"), ("/restained", "re-stained"))

# the settings every method shared before they were scaled to the schedule (what docs/pretraining.md's earlier figures used)
OLD_SETTINGS = {"lr": 0.06, "key_momentum": 0.999, "key_momentum_schedule": "constant", "negatives_fraction": 1.0}


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` pairs of the ``pretrain`` section (values read as YAML: numbers, true/false, null)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def pretrain_and_probe(ws, cfg, method: str, seed: int, steps: int, overrides: dict | None = None) -> dict:
    """Pretrain ``method`` for ``steps`` with ``seed`` and ``overrides`` of the pretrain section; the probe's
    metrics with ``minutes`` and the run id. The heads' folds play no part (the probe's tiles are on no slide),
    so pretraining reads every slide."""
    from histcode.ssl.pretrain import pretrain

    update = {"method": method, "seed": seed, "max_steps": steps, "exclude_test_folds": (), **(overrides or {})}
    run_cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update=update)})
    run_cfg = type(cfg).model_validate(run_cfg.model_dump())  # validate the overrides like params.yaml is
    start = time.perf_counter()
    result = pretrain(ws, run_cfg, progress=False)
    return {**result.probe, "minutes": (time.perf_counter() - start) / 60, "run_id": result.run_id}


def over_seeds(values: list[float]) -> tuple[float, float, float]:
    """(mean, and the 95% t-interval of the mean) of per-seed values; the interval is NaN for one seed."""
    from scipy.stats import t

    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = float(t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def cell(mean: float, lo: float, hi: float, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f.format(mean) + ("" if math.isnan(lo) else f" [{f.format(lo)}, {f.format(hi)}]")


def tiled_workspace(path):
    """(workspace, its config, the temporary folder to clean up or None): ``path``, or a temporary demo workspace
    when None, with telemetry off, warnings-only logging and its slides tiled as params.yaml says."""
    import logging

    from benchmarks._cohort import demo_workspace
    from histcode.store.catalog import Catalog
    from histcode.tiling.run import tile_slides
    from histcode.tracking import telemetry_off

    logging.basicConfig(level=logging.WARNING)
    telemetry_off()
    ws, tmp = demo_workspace(path)
    cfg = ws.config()
    tile_slides(Catalog.of(ws), cfg.tiling, ws.outputs_dir / "qc", progress=False)
    return ws, cfg, tmp
