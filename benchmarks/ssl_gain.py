"""What contrastive pretraining buys, with its uncertainty: each method pretrained for the same wall-clock time on
the demo cohort's tiles, with several seeds, then the linear probe's reporting half (LC25000 groups no setting
was ever chosen on) for each task apart: tissue (3 classes), tumour vs benign, LUAD vs LUSC.

    python benchmarks/ssl_gain.py [--workspace DIR] [--minutes 4] [--seeds 3] [--methods adco moco simclr]
                                  [--old-settings] [--set key=value ...] [--json OUT]

``--minutes`` is each run's pretraining time: each method's step time is measured first with the real training
loop (AdCo's bank warm-up counted apart) and its number of steps chosen to fill it, so every method trains on a
full cosine schedule; every seed of a method runs that many steps. Training goes through the same ``pretrain``
the pipeline calls (MLflow runs in experiment ``pretrain``, one registered encoder version per run) with the
workspace's params.yaml and the schedule-aware defaults (``histcode.ssl.schedule``); ``--old-settings`` runs
the settings every method shared before (lr 0.06, key momentum 0.999 constant, queue and bank unbounded) for
comparison, ``--set`` overrides single ``pretrain`` settings (what ``ssl_sweep.py`` chose on the tuning half).

Printed per method, task and image set (as they are, re-stained): the trained encoder's AUC, its random init's
and colour statistics', each the mean over seeds with a 95% t-interval, and the gains trained - random init and
trained - colour with the interval over seeds and, beside it, the mean of the per-seed paired grouped-bootstrap
intervals (``histcode.ssl.probe_stats``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks._pretraining import OLD_SETTINGS, SETS, TASKS, cell, over_seeds, parse_overrides, pretrain_and_probe, tiled_workspace  # noqa: E402


def step_seconds(ws, cfg, method: str, steps: int) -> tuple[float, float]:
    """(seconds per training step, seconds of the method's one-off start: AdCo's bank warm-up), measured with
    the real loop on the workspace's tiles."""
    import torch

    from histcode.ssl.augment import TwoViews
    from histcode.ssl.dataset import dataset_from_catalog
    from histcode.ssl.methods import build_method
    from histcode.ssl.pretrain import fresh_encoder, pretraining_data
    from histcode.ssl.stain_norm import normalise_dataset
    from histcode.ssl.train import Trainer
    from histcode.store.catalog import Catalog
    from histcode.tiling.spec import spec_id_of
    from histcode.runtime import resolve_device

    pcfg = cfg.pretrain.model_copy(update={"method": method, "log_every": 10**9, "checkpoint_every": 10**9})
    catalog = Catalog.of(ws)
    data = pretraining_data(catalog, cfg)
    dataset = dataset_from_catalog(catalog, spec_id_of(cfg.tiling), cfg.tiling.tile_px, slide_ids=data.slide_ids)
    normalise_dataset(dataset, pcfg.stain_norm)
    device = resolve_device(pcfg.device)
    trainer = Trainer(build_method(fresh_encoder(pcfg), pcfg, n_tiles=len(dataset)), TwoViews(pcfg.augment, pcfg.image_px),
                      dataset, pcfg,
                      device, steps + 1, ws.outputs_dir / "bench" / f"calibrate-{method}.pt")
    start = time.perf_counter()
    trainer.init_bank()
    setup = time.perf_counter() - start
    trainer.steps = 1
    trainer.fit(progress=False)  # warm-up step
    trainer.steps = steps + 1
    start = time.perf_counter()
    trainer.fit(progress=False)
    per_step = (time.perf_counter() - start) / steps
    dataset.close()
    del trainer
    torch.manual_seed(0)
    return per_step, setup


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per method x task x image set from the per-seed probe metrics of the reporting half."""
    rows = []
    for method, probes in runs.items():
        for task in TASKS:
            for suffix, what in SETS:
                key = f"probe/report/{task}{suffix}"
                if f"{key}/trained_auc" not in probes[0]:
                    continue
                row = {"method": method, "task": task, "set": what, "seeds": len(probes)}
                for name in ("trained", "random_init", "colour"):
                    row[name] = over_seeds([p[f"{key}/{name}_auc"] for p in probes])
                for other in ("random_init", "colour"):
                    gain = f"{key}/gain_vs_{other}"
                    row[f"gain_vs_{other}"] = over_seeds([p[gain] for p in probes])
                    row[f"gain_vs_{other}_bootstrap"] = (float(np.nanmean([p[f"{gain}_ci_low"] for p in probes])),
                                                         float(np.nanmean([p[f"{gain}_ci_high"] for p in probes])))
                rows.append(row)
    return rows


def print_table(rows: list[dict], steps: dict[str, int]) -> None:
    print(f"\n{'method':<8}{'steps':>6} {'task':<9}{'set':<11}{'trained':>24}{'random init':>24}{'colour':>24}"
          f"{'trained - random':>26}{'(bootstrap)':>18}{'trained - colour':>26}{'(bootstrap)':>18}")
    for r in rows:
        boot = lambda lo_hi: f"[{lo_hi[0]:+.3f}, {lo_hi[1]:+.3f}]"  # noqa: E731
        print(f"{r['method']:<8}{steps[r['method']]:>6} {r['task']:<9}{r['set']:<11}{cell(*r['trained']):>24}"
              f"{cell(*r['random_init']):>24}{cell(*r['colour']):>24}{cell(*r['gain_vs_random_init'], signed=True):>26}"
              f"{boot(r['gain_vs_random_init_bootstrap']):>18}{cell(*r['gain_vs_colour'], signed=True):>26}"
              f"{boot(r['gain_vs_colour_bootstrap']):>18}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help="a workspace with slides (default: a temporary demo one)")
    parser.add_argument("--minutes", type=float, default=4.0, help="pretraining minutes of each run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["adco", "moco", "simclr"], choices=["adco", "moco", "simclr"])
    parser.add_argument("--old-settings", action="store_true", help="the settings every method shared before")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--calibrate-steps", type=int, default=4, help="timed steps when measuring a method's step")
    parser.add_argument("--json", type=Path, help="write the rows here as well")
    args = parser.parse_args()

    import json

    ws, cfg, tmp = tiled_workspace(args.workspace)
    overrides = {**(OLD_SETTINGS if args.old_settings else {}), **parse_overrides(args.overrides)}
    cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update=overrides)})
    pc = cfg.pretrain
    print(f"{args.minutes:g} min per run, {args.seeds} seeds; {pc.encoder} at {pc.image_px} px, batch {pc.batch_size}, "
          f"stain normalisation {pc.stain_norm.method}; settings: {overrides or 'schedule-aware defaults'}", flush=True)
    runs, steps = {}, {}
    for method in args.methods:
        per_step, setup = step_seconds(ws, cfg, method, args.calibrate_steps)
        steps[method] = max(1, int((args.minutes * 60 - setup) / per_step))
        print(f"{method}: {per_step:.2f} s/step (+{setup:.0f} s start) -> {steps[method]} steps", flush=True)
        runs[method] = []
        for seed in range(args.seeds):
            probe = pretrain_and_probe(ws, cfg, method, seed, steps[method])  # cfg holds the overrides
            runs[method].append(probe)
            print(f"  seed {seed}: {probe['minutes']:.1f} min", flush=True)
    rows = summarise(runs)
    first = runs[args.methods[0]][0]
    print(f"\nlinear probe, reporting half ({int(first['probe/report/tiles'])} of {int(first['probe_tiles'])} "
          f"held-aside tiles), AUC: mean over seeds [95% t-interval]")
    print_table(rows, steps)
    if args.json:
        args.json.write_text(json.dumps({"steps": steps, "overrides": overrides, "rows": rows}, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
