"""Training throughput: the full step (read tiles, augment on the device, model) vs a bare step on tensors
already in memory, in the same run, with the same model and batch.

    python benchmarks/pretrain.py [--workspace DIR] [--method adco] [--steps 8] [--workers 0 2]

Also prints the parts: reading alone (DataLoader over the slides) and augmentation alone, each in tiles/s.
A tile is one training sample (two augmented views). The first step of every measurement is a warm-up and
is not counted. Where the full step is much slower than the bare one, data loading is not hidden behind
compute (raise --workers, or move augmentation to a GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cohort import demo_workspace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path)
    parser.add_argument("--method", default=None, help="default: pretrain.method of the workspace")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement (after 1 warm-up)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to try")
    args = parser.parse_args()

    import torch

    from histcode.ssl.augment import TwoViews
    from histcode.ssl.dataset import dataset_from_catalog
    from histcode.ssl.encoders import build_encoder
    from histcode.ssl.methods import build_method
    from histcode.ssl.train import Trainer
    from histcode.store.catalog import Catalog
    from histcode.tiling.run import tile_slides
    from histcode.tiling.spec import spec_id_of
    from histcode.runtime import resolve_device

    ws, tmp = demo_workspace(args.workspace)
    cfg = ws.config()
    catalog = Catalog.of(ws)
    tile_slides(catalog, cfg.tiling, ws.outputs_dir / "qc", progress=False)
    pcfg = cfg.pretrain.model_copy(update={"method": args.method or cfg.pretrain.method, "probe": cfg.pretrain.probe})
    device = resolve_device(pcfg.device)
    dataset = dataset_from_catalog(catalog, spec_id_of(cfg.tiling), cfg.tiling.tile_px)
    batch = pcfg.batch_size
    print(f"{pcfg.method} / {pcfg.encoder} at {pcfg.image_px} px, batch {batch}, on {device}; "
          f"{len(dataset)} tiles of {cfg.tiling.tile_px} px; torch threads {torch.get_num_threads()}")

    def trainer(workers: int, steps: int) -> Trainer:
        torch.manual_seed(0)
        method = build_method(build_encoder(pcfg.encoder), pcfg.model_copy(update={"bank_size": batch}))
        run_cfg = pcfg.model_copy(update={"num_workers": workers, "log_every": 10**9, "checkpoint_every": 10**9,
                                          "bank_size": batch})
        return Trainer(method, TwoViews(pcfg.augment, pcfg.image_px), dataset, run_cfg, device, steps,
                       ws.outputs_dir / "bench" / "ckpt.pt")

    def timed_fit(workers: int) -> float:
        t = trainer(workers, args.steps + 1)
        t.init_bank()
        t.steps = 1
        t.fit(progress=False)  # warm-up step (and worker start-up)
        t.steps = args.steps + 1
        start = time.perf_counter()
        t.fit(progress=False)
        return args.steps * batch / (time.perf_counter() - start)

    results = {f"full step, {w} workers": timed_fit(w) for w in args.workers}

    # the bare step: the same model and optimiser on views already in memory
    t = trainer(0, args.steps + 1)
    t.init_bank()
    tiles = torch.stack([dataset[i] for i in range(batch)]).to(device)
    v1, v2 = t.augment(tiles)

    def bare_step() -> None:
        loss = t.model(v1, v2)
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t.optimizer.step()
        t.method.after_step()

    bare_step()
    start = time.perf_counter()
    for _ in range(args.steps):
        bare_step()
    results["bare step (views in memory)"] = args.steps * batch / (time.perf_counter() - start)

    t.augment(tiles)
    start = time.perf_counter()
    for _ in range(args.steps):
        t.augment(tiles)
    results["augmentation only (2 views)"] = args.steps * batch / (time.perf_counter() - start)

    loader = t.loader(0, args.steps + 1)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(it)
    results["reading only (0 workers)"] = args.steps * batch / (time.perf_counter() - start)
    dataset.close()

    print(f"\n{'measurement':<32}{'tiles/s':>10}")
    for name, rate in results.items():
        print(f"{name:<32}{rate:>10.1f}")
    bare = results["bare step (views in memory)"]
    for w in args.workers:
        full = results[f"full step, {w} workers"]
        print(f"ratio full : bare step, {w} workers = {full / bare:.2f} : 1")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
