"""Materialisation throughput: tiles/s of `histcode embed` (read the slides, run the encoder, write LanceDB and
the ledger) vs the bare model forward on tensors already in memory, same encoder, same batch, same run.

    python benchmarks/embed.py [--workspace DIR] [--repeats 3]

Needs a workspace with tiles and a registered encoder (after `make demo`, the repository itself:
`--workspace .`); without one it builds the demo cohort and registers a 1-step encoder in a temporary workspace.
Materialisation runs on a copy of the workspace, so nothing of yours is rewritten.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cohort import demo_workspace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from histcode.features.embed import materialize
    from histcode.features.registry import describe_view
    from histcode.ssl.pretrain import pretrain
    from histcode.store.catalog import Catalog
    from histcode.tiling.run import tile_slides
    from histcode.tiling.spec import spec_id_of
    from histcode.tracking import Tracker, telemetry_off
    from histcode.workspace import Workspace
    from histcode.runtime import resolve_device

    telemetry_off()
    source, tmp = demo_workspace(args.workspace)
    cfg = source.config()
    tile_slides(Catalog(source.catalog_path), cfg.tiling, source.outputs_dir / "qc", progress=False)
    tracker = Tracker(source)
    try:
        view = describe_view(tracker, cfg.features.encoder, spec_id_of(cfg.tiling), cfg.features.attribute_columns)
    except LookupError:
        print("no registered encoder: registering a 1-step one (throughput does not depend on training)", flush=True)
        quick = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"max_steps": 1, "bank_size": 64,
                                                                                   "probe": cfg.pretrain.probe.model_copy(update={"enabled": False})})})
        pretrain(source, quick, progress=False)
        view = describe_view(tracker, cfg.features.encoder, spec_id_of(cfg.tiling), cfg.features.attribute_columns)

    rates = []
    n_tiles = 0
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="histcode-embed-bench-") as scratch:
            ws = Workspace(Path(scratch))
            ws.data_dir.mkdir(parents=True)
            shutil.copy2(source.catalog_path, ws.catalog_path)
            shutil.copytree(source.mlruns_dir, ws.mlruns_dir)
            if source.params_path.exists():
                shutil.copy2(source.params_path, ws.params_path)
            with Catalog.of(ws).transaction() as con:
                con.execute("DELETE FROM materializations")
            report = materialize(ws, ws.config(), encoder=view.encoder_uri.removeprefix("models:/"), progress=False)
            rates.append(report.tiles_per_s)
            n_tiles = report.tiles_embedded

    device = resolve_device(cfg.features.device)
    model = tracker.load_model(view.encoder_uri).to(device)
    batch = torch.rand(cfg.features.batch_size, 3, view.image_px, view.image_px, device=device)
    with torch.inference_mode():
        model(batch)
        start = time.perf_counter()
        done = 0
        while done < n_tiles:
            model(batch)
            done += len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    bare = done / (time.perf_counter() - start)

    best = max(rates)
    print(f"\nview {view.view_id}: {view.encoder_uri}, {view.dim}-d at {view.image_px} px, batch "
          f"{cfg.features.batch_size}, {n_tiles} tiles, on {device}")
    print(f"{'materialisation (read + embed + write)':<42}{best:>8.1f} tiles/s (best of {args.repeats}: "
          f"{', '.join(f'{r:.1f}' for r in rates)})")
    print(f"{'bare forward on tensors in memory':<42}{bare:>8.1f} tiles/s")
    print(f"ratio materialisation : bare forward = {best / bare:.2f} : 1")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
