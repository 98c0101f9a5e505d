"""The device check: one command, a few minutes on one GPU, nothing downloaded. Each stage of the data path is
timed through the product's own code and set beside the bare model on tensors already on the device, with the
device's memory peak, in one run:

    python benchmarks/gpu.py [--workspace DIR] [--device cuda] [--quick] [--json FILE]

  1. tissue detection (histcode.wsi.tissue.detect_tissue) on the device against the CPU path, slides/s, and the
     two masks compared pixel by pixel;
  2. the parallel tile reader alone (spawned DataLoader readers over the slides), tiles/s at 224 px: the read
     limit of materialisation;
  3. materialisation (histcode.features.embed.materialize: read, stain-normalise, embed, write Lance and the
     ledger) with the paper's encoder, ResNet-50 truncated after layer 3 (1024-d) at 224 px, random init
     (throughput does not depend on the weights), against its bare forward and against the read limit;
  4. one AdCo pretraining step, batch 256, AMP (histcode.ssl.train.Trainer.fit: read, augment on the device,
     forward, backward) against the bare step on views already on the device;
  5. heads training (histcode.heads.fit.fit_head, CLAM_SB on 1024-d bags of 2,000 tiles) against the bare loop.

Goals on one H100-class GPU (issue 14): >= 3,000 tiles/s materialised and >= 0.8 of the read limit; a
pretraining step >= 0.9 of the bare step. ``--quick`` shrinks every size (ResNet-18 truncated, 64 px, batch 16)
so that the script runs on a CPU in a minute or two: the test suite runs it that way, so the device run does
not find a bug. Without ``--workspace`` the demo cohort is built and tiled in a temporary workspace first
(on 16 cores about a minute).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cohort import demo_workspace  # noqa: E402


class Meter:
    """Wall time with the device synchronised, and the device's memory peak since the last reset."""

    def __init__(self, device) -> None:
        import torch

        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        if self.cuda:
            self.sync()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def time(self, fn, repeats: int = 1) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.sync()
        return (time.perf_counter() - start) / repeats


def tissue_stage(ws, cfg, device, meter: Meter, out: dict) -> None:
    import numpy as np
    import torch

    from histcode.store.catalog import Catalog
    from histcode.wsi.reader import OpenSlideReader, render_at_mpp
    from histcode.wsi.tissue import detect_tissue

    images = []
    for slide in Catalog.of(ws).slides(status="ok"):
        mpp = float(slide["mpp_x"])
        with OpenSlideReader(Path(slide["path"])) as reader:
            low, low_ds = render_at_mpp(reader, mpp, cfg.tiling.mask.mpp)
        images.append((low, low_ds[0] * mpp, low_ds))
    cpu = torch.device("cpu")

    def run(on) -> list:
        return [detect_tissue(img, m, ds, cfg.tiling.mask, on).mask for img, m, ds in images]

    run(cpu), run(device)  # warm-up (CUDA context, kernels)
    cpu_s = Meter(cpu).time(lambda: run(cpu))
    meter.reset()
    dev_s = meter.time(lambda: run(device))
    a, b = run(cpu), run(device)
    disagree = [float(np.mean(np.asarray(x) != np.asarray(y))) for x, y in zip(a, b)]
    out["tissue"] = {"slides": len(images), "cpu_slides_per_s": len(images) / cpu_s,
                     "device_slides_per_s": len(images) / dev_s, "identical_masks": sum(d == 0 for d in disagree),
                     "max_pixel_disagreement": max(disagree), "peak_gib": meter.peak_gib()}


def reader_stage(ws, cfg, image_px: int, batch: int, workers: int, out: dict) -> float:
    from torch.utils.data import DataLoader

    from histcode.features.embed import SlideBatches, _ReadOrReport
    from histcode.ssl.dataset import dataset_from_catalog
    from histcode.store.catalog import Catalog
    from histcode.tiling.spec import spec_id_of

    dataset = dataset_from_catalog(Catalog.of(ws), spec_id_of(cfg.tiling), image_px)
    loader = DataLoader(_ReadOrReport(dataset), batch_sampler=SlideBatches(dataset.tiles[:, 0], batch),
                        num_workers=workers, multiprocessing_context="spawn" if workers else None, pin_memory=False)
    start, n = None, 0
    for index, _, _ in loader:
        if start is None:  # the first batch pays for starting the readers
            start = time.perf_counter()
            continue
        n += len(index)
    rate = n / (time.perf_counter() - start) if n else 0.0
    out["reader"] = {"tiles": len(dataset), "workers": workers, "tiles_per_s": rate}
    dataset.close()
    return rate


def materialise_stage(ws, cfg, encoder: str, image_px: int, batch: int, workers: int, device, meter: Meter,
                      read_limit: float, out: dict) -> None:
    import torch

    from histcode.features.embed import materialize
    from histcode.ssl.pretrain import register_baseline_encoder
    from histcode.store.catalog import Catalog
    from histcode.tracking import Tracker

    pcfg = cfg.pretrain.model_copy(update={"encoder": encoder, "image_px": image_px, "register_as": "gpu-check-encoder"})
    version = register_baseline_encoder(ws, cfg.model_copy(update={"pretrain": pcfg}), "random")
    fcfg = cfg.features.model_copy(update={"batch_size": batch, "num_workers": workers, "device": device.type})
    run_cfg = cfg.model_copy(update={"features": fcfg})
    with Catalog.of(ws).transaction() as con:
        con.execute("DELETE FROM materializations")
    meter.reset()
    report = materialize(ws, run_cfg, encoder=f"gpu-check-encoder/{version}", progress=False)
    peak = meter.peak_gib()
    model = Tracker(ws).load_model(f"models:/gpu-check-encoder/{version}").to(device)
    x = torch.rand(batch, 3, image_px, image_px, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and fcfg.amp else None
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode():
            if amp is None:
                model(x)
            else:
                with amp:
                    model(x)

    forward()
    steps = max(3, report.tiles_embedded // batch)
    bare = batch / meter.time(forward, steps)
    out["materialise"] = {"encoder": encoder, "image_px": image_px, "batch": batch, "tiles": report.tiles_embedded,
                          "tiles_per_s": report.tiles_per_s, "bare_forward_tiles_per_s": bare,
                          "ratio_to_bare": report.tiles_per_s / bare,
                          "ratio_to_read_limit": report.tiles_per_s / read_limit if read_limit else None,
                          "peak_gib": peak}


def pretrain_stage(ws, cfg, encoder: str, image_px: int, batch: int, bank: int, steps: int, workers: int, device,
                   meter: Meter, out: dict) -> None:
    import torch

    from histcode.ssl.augment import TwoViews
    from histcode.ssl.dataset import dataset_from_catalog
    from histcode.ssl.encoders import build_encoder
    from histcode.ssl.methods import build_method
    from histcode.ssl.train import Trainer
    from histcode.store.catalog import Catalog
    from histcode.tiling.spec import spec_id_of

    pcfg = cfg.pretrain.model_copy(update={"method": "adco", "encoder": encoder, "image_px": image_px,
                                           "batch_size": batch, "bank_size": bank, "bank_init": "keys", "amp": True,
                                           "num_workers": workers, "log_every": 10**9, "checkpoint_every": 10**9,
                                           "device": device.type, "locality_chunk": 8})
    dataset = dataset_from_catalog(Catalog.of(ws), spec_id_of(cfg.tiling), cfg.tiling.tile_px)
    torch.manual_seed(0)
    trainer = Trainer(build_method(build_encoder(encoder), pcfg), TwoViews(pcfg.augment, image_px), dataset, pcfg,
                      device, steps + 1, ws.outputs_dir / "gpu-check" / "ckpt.pt")
    trainer.init_bank()
    trainer.steps = 1
    trainer.fit(progress=False)  # warm-up step, reader start-up
    trainer.steps = steps + 1
    meter.reset()
    full = meter.time(lambda: trainer.fit(progress=False)) / steps
    peak = meter.peak_gib()
    tiles = torch.stack([dataset[i % len(dataset)] for i in range(batch)]).to(device)
    v1, v2 = trainer.augment(tiles)
    if trainer.channels_last:
        v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))

    def bare_step() -> None:
        with torch.autocast(device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None):
            loss = trainer.model(v1, v2)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.scaler.scale(loss).backward()
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        trainer.method.after_step()

    bare_step()
    bare = meter.time(bare_step, steps)
    dataset.close()
    out["pretrain"] = {"method": "adco", "encoder": encoder, "image_px": image_px, "batch": batch,
                       "step_s": full, "bare_step_s": bare, "tiles_per_s": batch / full,
                       "ratio_to_bare": bare / full, "amp": str(trainer.amp_dtype), "peak_gib": peak}


def heads_stage(cfg, dim: int, bags: int, tiles: int, epochs: int, device, meter: Meter, out: dict) -> None:
    import numpy as np
    import torch

    from histcode.heads.fit import fit_head
    from histcode.heads.models import CLAMSingleBranch
    from histcode.heads.tasks import TASKS

    rng = np.random.default_rng(0)
    pairs = [((rng.normal(size=(tiles, dim)) + (i % 2)).astype(np.float32), i % 2) for i in range(bags)]
    hcfg = cfg.heads.model_copy(update={"epochs": epochs, "min_epochs": epochs, "patience": epochs + 1,
                                        "device": device.type, "standardise": "none"})
    meter.reset()
    fit_s = meter.time(lambda: fit_head(TASKS["tumor"], "attention", pairs, pairs[:2], {"classes": 2}, hcfg, 0))
    peak = meter.peak_gib()
    model = CLAMSingleBranch(dim, 2, k_sample=hcfg.k_sample).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=hcfg.lr)
    on_device = [(torch.as_tensor(b, device=device), y) for b, y in pairs]

    def bare_epoch() -> None:
        for bag, y in on_device:
            loss = model.loss(bag, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    bare_epoch()
    bare_s = meter.time(bare_epoch, epochs)
    per_epoch = fit_s / epochs
    out["heads"] = {"bags": bags, "tiles_per_bag": tiles, "dim": dim, "epoch_s": per_epoch, "bare_epoch_s": bare_s,
                    "bags_per_s": bags / per_epoch, "ratio_to_bare": bare_s / per_epoch, "peak_gib": peak}


def _f(v, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


LINES = {  # stage -> its line of the report
    "tissue": lambda t: (f"tissue detection: {_f(t['device_slides_per_s'])} slides/s on the device vs "
                         f"{_f(t['cpu_slides_per_s'])} on the CPU ({t['device_slides_per_s'] / t['cpu_slides_per_s']:.2f} : 1); "
                         f"masks identical on {t['identical_masks']}/{t['slides']} slides (max pixel disagreement "
                         f"{t['max_pixel_disagreement']:.2%})"),
    "reader": lambda r: f"parallel reader alone: {_f(r['tiles_per_s'])} tiles/s ({r['workers']} spawned readers)",
    "materialise": lambda m: (f"materialisation ({m['encoder']}, {m['image_px']} px, batch {m['batch']}): "
                              f"{_f(m['tiles_per_s'])} tiles/s; bare forward {_f(m['bare_forward_tiles_per_s'])}; "
                              f"materialisation : bare = {m['ratio_to_bare']:.2f} : 1; : read limit = "
                              f"{_f(m['ratio_to_read_limit'], 2)} : 1; peak {_f(m['peak_gib'], 2)} GiB"),
    "pretrain": lambda p: (f"pretraining step (AdCo, {p['encoder']}, {p['image_px']} px, batch {p['batch']}, {p['amp']}): "
                           f"{p['step_s'] * 1000:.0f} ms ({_f(p['tiles_per_s'])} tiles/s); bare step "
                           f"{p['bare_step_s'] * 1000:.0f} ms; bare : full = {p['ratio_to_bare']:.2f} : 1; peak "
                           f"{_f(p['peak_gib'], 2)} GiB"),
    "heads": lambda h: (f"heads training (CLAM_SB, {h['bags']} bags of {h['tiles_per_bag']} x {h['dim']}): "
                        f"{_f(h['bags_per_s'])} bags/s; bare : fit_head = {h['ratio_to_bare']:.2f} : 1; peak "
                        f"{_f(h['peak_gib'], 2)} GiB"),
}


def report(out: dict) -> str:
    lines = [f"device: {out['device']}; torch {out['torch']}; {out.get('gpu', 'no GPU')}"]
    for stage, line in LINES.items():
        r = out.get(stage)
        if r is not None:
            lines.append(f"{stage}: FAILED: {r['error']}" if "error" in r else line(r))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help="a workspace with the demo cohort ingested (copied first)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU run that exercises every stage")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import os

    import torch

    from histcode.runtime import resolve_device, resolve_workers
    from histcode.tiling.run import tile_slides
    from histcode.tracking import telemetry_off
    from histcode.store.catalog import Catalog

    telemetry_off()
    device = resolve_device(args.device)
    meter = Meter(device)
    sizes = (dict(encoder="resnet18_l3", image_px=64, batch=16, pretrain_batch=16, bank=64, steps=2, bags=6, tiles=50,
                  epochs=2, dim=64) if args.quick else
             dict(encoder="resnet50_l3", image_px=224, batch=256, pretrain_batch=256, bank=16384, steps=10, bags=64, tiles=2000,
                  epochs=3, dim=1024))
    out: dict = {"device": str(device), "torch": torch.__version__, "sizes": sizes, "cores": os.cpu_count()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    with tempfile.TemporaryDirectory(prefix="histcode-gpu-check-") as scratch:
        if args.workspace:
            root = Path(scratch) / "ws"
            shutil.copytree(args.workspace, root, ignore=shutil.ignore_patterns("lancedb", "outputs"))
            ws, tmp = demo_workspace(root)
        else:
            ws, tmp = demo_workspace(Path(scratch) / "ws")
        cfg = ws.config()
        if args.quick:
            cfg = cfg.model_copy(update={"tiling": cfg.tiling.model_copy(update={"device": device.type})})
        print("tiling the cohort ...", flush=True)
        tile_slides(Catalog.of(ws), cfg.tiling, ws.outputs_dir / "qc", progress=False)
        workers = resolve_workers("auto", device)
        stages = [
            ("tissue", lambda: tissue_stage(ws, cfg, device, meter, out)),
            ("reader", lambda: out.__setitem__("_read", reader_stage(ws, cfg, sizes["image_px"], sizes["batch"], workers, out))),
            ("materialise", lambda: materialise_stage(ws, cfg, sizes["encoder"], sizes["image_px"], sizes["batch"], workers,
                                                      device, meter, out.get("_read", 0.0), out)),
            ("pretrain", lambda: pretrain_stage(ws, cfg, sizes["encoder"], sizes["image_px"], sizes["pretrain_batch"],
                                                sizes["bank"], sizes["steps"], workers, device, meter, out)),
            ("heads", lambda: heads_stage(cfg, sizes["dim"], sizes["bags"], sizes["tiles"], sizes["epochs"], device, meter, out)),
        ]
        for name, run in stages:
            print(f"{name} ...", flush=True)
            started = time.perf_counter()
            try:
                run()
            except Exception as exc:  # noqa: BLE001 -- one failed stage must not hide the others' figures
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
        out.pop("_read", None)
        if tmp is not None:
            tmp.cleanup()
    print("\n" + report(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    if any(isinstance(v, dict) and "error" in v for v in out.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
