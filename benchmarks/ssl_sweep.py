"""A small sweep of the short-schedule pretraining settings, scored on the probe's tuning half only: the settings
``ssl_gain.py`` then reports on the reporting half, which no choice here ever read.

    python benchmarks/ssl_sweep.py [--workspace DIR] [--method adco] [--steps 120] [--seed 0]
                                   [--lr-scale 0.5 1 2] [--negatives 0.25 0.5] [--json OUT]

Every cell pretrains ``--method`` for ``--steps`` (the same for every cell, so the cells cost the same) through
the pipeline's ``pretrain`` with one combination of ``lr_scale`` (times the linear-scaling rate) and
``negatives_fraction`` (queue or bank as a share of the tiles), plus one cell with the settings every method
shared before (lr 0.06, key momentum 0.999 constant, unbounded negatives). A cell's score is the mean, over the
three probe tasks and both image sets, of the trained encoder's AUC on the tuning half; the best cell is printed
as the ``--set`` arguments for ``ssl_gain.py``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks._pretraining import OLD_SETTINGS, SETS, TASKS, pretrain_and_probe, tiled_workspace  # noqa: E402


def tuning_score(probe: dict) -> tuple[float, dict[str, float]]:
    """(the cell's score, its per task x set AUCs) from the tuning half."""
    parts = {f"{task}{suffix or ''}": probe.get(f"probe/tune/{task}{suffix}/trained_auc", float("nan"))
             for task in TASKS for suffix, _ in SETS}
    return float(np.nanmean(list(parts.values()))), parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help="a workspace with slides (default: a temporary demo one)")
    parser.add_argument("--method", default="adco", choices=["adco", "moco", "simclr"])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr-scale", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    parser.add_argument("--negatives", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--json", type=Path, help="write the cells here as well")
    args = parser.parse_args()

    import json

    ws, cfg, tmp = tiled_workspace(args.workspace)
    cells = [("old settings", dict(OLD_SETTINGS))]
    cells += [(f"lr_scale {lr:g}, negatives {neg:g}", {"lr_scale": lr, "negatives_fraction": neg})
              for lr, neg in itertools.product(args.lr_scale, args.negatives)]
    print(f"{args.method}, {args.steps} steps per cell, seed {args.seed}; scored on the probe's tuning half", flush=True)
    results = []
    for name, overrides in cells:
        probe = pretrain_and_probe(ws, cfg, args.method, args.seed, args.steps, overrides)
        score, parts = tuning_score(probe)
        results.append({"cell": name, "overrides": overrides, "score": score, "auc": parts,
                        "minutes": probe["minutes"]})
        print(f"{name:<32} score {score:.3f}  " + "  ".join(f"{k} {v:.3f}" for k, v in parts.items())
              + f"  ({probe['minutes']:.1f} min)", flush=True)
    best = max((r for r in results if r["cell"] != "old settings"), key=lambda r: r["score"])
    print(f"\nbest on the tuning half: {best['cell']} ({best['score']:.3f}); for ssl_gain.py: "
          + " ".join(f"--set {k}={v}" for k, v in best["overrides"].items()))
    if args.json:
        args.json.write_text(json.dumps({"method": args.method, "steps": args.steps, "cells": results}, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
