"""What contrastive pretraining buys at a fixed compute budget: each method pretrained for the same wall-clock
time on the demo cohort's tiles, then the linear probe of each against random init and colour statistics.

    python benchmarks/ssl_gain.py [--workspace DIR] [--budget 24] [--methods adco moco simclr]

``--budget`` is the total pretraining time in minutes, shared equally by the methods (the probes come on top,
about half a minute each). Each method's step time is measured first with the real training loop (AdCo's bank
warm-up counted apart), and the number of steps is chosen to fill its share, so that every method trains on a
full cosine schedule. Training goes through the same ``pretrain`` the pipeline calls (MLflow runs in experiment
``pretrain`` of the workspace, one registered encoder version per method) with every other setting from the
workspace's params.yaml.

The probe (``histcode.ssl.probe``) is reported on the held-aside LC25000 tiles as they are and re-stained (a
random H&E stain per tile in optical-density space, log-scale sd ``pretrain.probe.stain_log_sd``): trained,
random init and colour side by side, macro one-vs-rest AUC and accuracy, all from one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cohort import demo_workspace  # noqa: E402


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
    trainer = Trainer(build_method(fresh_encoder(pcfg), pcfg), TwoViews(pcfg.augment, pcfg.image_px), dataset, pcfg,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help="a workspace with slides (default: a temporary demo one)")
    parser.add_argument("--budget", type=float, default=24.0, help="total pretraining minutes, shared by the methods")
    parser.add_argument("--methods", nargs="+", default=["adco", "moco", "simclr"], choices=["adco", "moco", "simclr"])
    parser.add_argument("--calibrate-steps", type=int, default=4, help="timed steps when measuring a method's step")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from histcode.ssl.pretrain import pretrain
    from histcode.store.catalog import Catalog
    from histcode.tiling.run import tile_slides
    from histcode.tracking import telemetry_off

    telemetry_off()
    ws, tmp = demo_workspace(args.workspace)
    cfg = ws.config()
    tile_slides(Catalog.of(ws), cfg.tiling, ws.outputs_dir / "qc", progress=False)
    share = args.budget * 60 / len(args.methods)
    pc = cfg.pretrain
    print(f"budget {args.budget:g} min: {share / 60:.1f} min per method; {pc.encoder} at {pc.image_px} px, batch "
          f"{pc.batch_size}, stain normalisation {pc.stain_norm.method}, re-staining log-sd {pc.probe.stain_log_sd}",
          flush=True)
    rows = []
    for method in args.methods:
        per_step, setup = step_seconds(ws, cfg, method, args.calibrate_steps)
        steps = max(1, int((share - setup) / per_step))
        print(f"{method}: {per_step:.2f} s/step (+{setup:.0f} s start) -> {steps} steps", flush=True)
        run_cfg = cfg.model_copy(update={"pretrain": pc.model_copy(update={"method": method, "max_steps": steps})})
        start = time.perf_counter()
        result = pretrain(ws, run_cfg, progress=False)
        rows.append((method, steps, (time.perf_counter() - start) / 60, result.probe))

    print(f"\nlinear probe on {int(rows[0][3]['probe_tiles'])} held-aside tiles, macro AUC (accuracy); "
          "each method's own random init is the same network at its start")
    head = f"{'method':<8}{'steps':>7}{'min':>6}  {'set':<11}{'trained':>15}{'random init':>15}{'colour':>15}{'gain':>8}"
    print(head)
    for method, steps, minutes, p in rows:
        for suffix, what in (("", "as is"), ("_restained", "re-stained")):
            def cell(key: str) -> str:
                return f"{p[f'{key}{suffix}_macro_auc']:.3f} ({p[f'{key}{suffix}_accuracy']:.3f})"

            lead = f"{method:<8}{steps:>7}{minutes:>6.1f}" if not suffix else " " * 21
            print(f"{lead}  {what:<11}{cell('probe'):>15}{cell('probe_random_init'):>15}{cell('probe_colour'):>15}"
                  f"{p[f'probe_gain{suffix}_macro_auc']:>+8.3f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
