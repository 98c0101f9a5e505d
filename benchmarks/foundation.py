"""Foundation encoders on this machine: what registering costs, and tiles/s of each encoder's forward beside
HistCode's own encoder, same batch, same run.

    python benchmarks/foundation.py [--encoders kaiko-vit-s16 ctranspath uni] [--batch 16] [--batches 3] [--memory uni]
                                    [--storage kaiko-vit-s16 uni]

Weights are random (the published ones are not shipped): throughput does not depend on them. For each entry it
prints the strict load of a state dict in the published layout (seconds), the export to a `torch.export` program
(seconds), and tiles/s of the exported program at the entry's input size, next to `resnet18_l3` at 224 px. Every
registry entry is also built on the meta device (no memory) and its parameter count printed, and the peak memory of
loading one entry's weights is measured both ways: built with random weights then copied into, and built on the
meta device with the file's tensors assigned (what `histcode encoders register` does). ``--storage`` logs each entry
named into a scratch workspace in both layouts: that of versions registered before (a second copy of the weights in
the program) and the one used now (the weights once, in the module's state dict; the program without them). It
also registers the entry through `histcode encoders register`'s own function. For each version it prints the bytes
of MLflow artifacts kept, against the state dict's size, and checks that the loaded program embeds as the module.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _throughput(model, px: int, batch: int, batches: int) -> float:
    import torch

    x = torch.rand(batch, 3, px, px)
    with torch.inference_mode():
        model(x)  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            model(x)
    return batch * batches / (time.perf_counter() - start)


def _export(module, px: int):
    import torch

    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(module, (torch.rand(2, 3, px, px),), dynamic_shapes=({0: batch},)).module()


def _load_peak_rss(name: str, file: Path, weightless: bool) -> float:
    """Peak RSS (MB) of a fresh process that builds ``name`` and loads ``file`` into it, as registering does."""
    import subprocess

    code = ("import resource, torch; from histcode.ssl.foundation import build_foundation, foundation_spec; "
            "from histcode.ssl.weights import load_published, read_state_dict; "
            f"e = build_foundation({name!r}, weightless={weightless}); "
            f"load_published(foundation_spec({name!r}), e, read_state_dict(__import__('pathlib').Path({str(file)!r})), 'f'); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _storage(names: list[str]) -> None:
    """Bytes per registered version, each layout, with the seconds to log it and to load the program back."""
    import tempfile

    import torch

    from histcode.apps.encoders import register_foundation
    from histcode.ssl.foundation import build_foundation, foundation_spec, timm_module
    from histcode.ssl.modules import MODULE_ARTIFACT, STATE, log_module
    from histcode.tracking import Tracker
    from histcode.workspace import Workspace

    print("\nregistering, MB of MLflow artifacts per version (run: the module; model: the program, MLmodel, input "
          "example):")
    print(f"{'encoder':15s} {'weights':>8s} {'layout':17s} {'run':>8s} {'model':>8s} {'total':>8s} {'x weights':>9s} "
          f"{'log s':>6s} {'load s':>7s}")
    for name in names:
        spec = foundation_spec(name)
        if spec.key_layout != "timm":
            raise SystemExit(f"--storage takes entries published in timm's layout, not {name}")
        with tempfile.TemporaryDirectory(prefix="histcode-bench-") as tmp:
            ws = Workspace(Path(tmp) / "ws").ensure()
            cfg, tracker = ws.config(), Tracker(ws)
            torch.manual_seed(0)
            encoder = build_foundation(name).eval()  # random weights, saved as the authors publish them
            file = Path(tmp) / spec.weight_files[0]
            state = {k: v.contiguous() for k, v in timm_module(encoder).state_dict().items()}
            if file.suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file(state, str(file))
            else:
                torch.save(state, file)
            del state
            weights = sum(t.numel() * t.element_size() for t in encoder.state_dict().values())
            px, rows = spec.input_px, []
            for layout, model, weights_artifact in (("weights twice", "before", None),  # the layout before issue 28
                                                    ("weights once", "now", f"{MODULE_ARTIFACT}/{STATE}")):
                start = time.perf_counter()  # what `encoders register` does once the weights are loaded
                with tracker.run("encoders", f"{name}, {layout}") as run_id:
                    log_module(tracker, run_id, encoder)
                    _, version = tracker.log_torch_model(run_id, encoder, "encoder", (3, px, px), spec.dim, model,
                                                         weights_artifact=weights_artifact)
                rows.append((layout, model, version, time.perf_counter() - start))
            registered = register_foundation(ws, cfg, name, file)  # the command's own path stores the same bytes
            rows.append(("encoders register", registered.model_name, registered.version, float("nan")))
            x = torch.rand(2, 3, px, px)
            with torch.inference_mode():
                want = encoder(x)
            for layout, model, version, log_s in rows:
                start = time.perf_counter()
                program = tracker.load_model(f"models:/{model}/{version}")
                load_s = time.perf_counter() - start
                with torch.inference_mode():
                    assert torch.allclose(program(x), want, atol=1e-4), f"{name} {layout}: other embeddings"
                del program
                b = tracker.stored_bytes(model, version)
                total = b["run"] + b["model"]
                print(f"{name:15s} {weights / 1e6:8.1f} {layout:17s} {b['run'] / 1e6:8.1f} {b['model'] / 1e6:8.1f} "
                      f"{total / 1e6:8.1f} {total / weights:9.3f} {log_s:6.1f} {load_s:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="*", default=["kaiko-vit-s16", "ctranspath", "uni"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--memory", default="uni", help="Entry whose load peak RSS is measured ('' to skip).")
    parser.add_argument("--storage", nargs="*", default=["kaiko-vit-s16", "uni"],
                        help="Entries whose registration's disk cost is measured (none to skip).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.storage:
        _storage(args.storage)

    import torch

    from histcode.ssl.encoders import build_encoder
    from histcode.ssl.foundation import FOUNDATION, build_foundation, foundation_spec, timm_module
    from histcode.ssl.weights import load_published

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\nregistry, built on the meta device:")
    for name in FOUNDATION:
        start = time.perf_counter()
        with torch.device("meta"):
            encoder = build_foundation(name)
        n = sum(p.numel() for p in encoder.parameters())
        print(f"  {name:15s} {n / 1e6:7.1f}M parameters, dim {encoder.dim:5d}, built in {time.perf_counter() - start:.2f} s")

    ours = build_encoder("resnet18_l3").eval()
    reference = _throughput(_export(ours, 224), 224, args.batch, args.batches)
    print(f"\nresnet18_l3 (HistCode's demo encoder) at 224 px: {reference:.1f} tiles/s")
    if args.memory:
        import tempfile

        spec = foundation_spec(args.memory)
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / spec.weight_files[0]
            torch.save(timm_module(build_foundation(args.memory)).state_dict(), file)
            size = file.stat().st_size / 2**20
            built = _load_peak_rss(args.memory, file, weightless=False)
            weightless = _load_peak_rss(args.memory, file, weightless=True)
        print(f"loading {args.memory} ({size:.0f} MB file): peak RSS built then copied {built:.0f} MB, "
              f"built without memory and assigned {weightless:.0f} MB ({built / weightless:.2f} : 1)")
    print(f"{'encoder':15s} {'px':>4s} {'load s':>7s} {'export s':>8s} {'tiles/s':>8s} {'vs resnet18_l3':>15s}")
    for name in args.encoders:
        spec = foundation_spec(name)
        published = build_foundation(name)

        state = timm_module(published).state_dict() if spec.key_layout == "timm" else None
        encoder = build_foundation(name).eval()
        start = time.perf_counter()
        if state is not None:
            load_published(spec, encoder, state, "random weights")
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        program = _export(encoder, spec.input_px)
        export_s = time.perf_counter() - start
        rate = _throughput(program, spec.input_px, args.batch, args.batches)
        loaded = f"{load_s:7.2f}" if state is not None else "      -"
        print(f"{name:15s} {spec.input_px:4d} {loaded} {export_s:8.1f} {rate:8.1f} {rate / reference:10.3f} : 1")


if __name__ == "__main__":
    main()
