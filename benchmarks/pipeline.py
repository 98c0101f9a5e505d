"""Wall time of the whole pipeline (flows/pipeline.py, a real Prefect run) on the demo cohort: the first run, an
unchanged rerun, and adding one slide to the cohort, each as a ratio to the first run.

    python benchmarks/pipeline.py [--workspace DIR] [--heads-epochs N]

The cohort is built once; the first run sees all slides but one (a normal slide, with its expression sample held
back too), the third run adds that slide back with the full expression matrix, reusing the first run's
registered encoder (`encoder` parameter): ingest, tiling and embedding touch the new slide only; the label set
changes (a new slide and a new sample), so the gate and the heads run again, as they must.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

for _key, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false",
                     "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(_key, _value)


def _hold_back_one_slide(cohort, out: Path) -> tuple[Path, Path, str]:
    """A manifest without one normal slide and an expression matrix without its sample."""
    import pandas as pd

    manifest = pd.read_csv(cohort.manifest)
    held = sorted(s for s in manifest.slide_id if "-11" in s)[0]
    kept = manifest[manifest.slide_id != held].copy()
    for column in ("path", "mask"):  # the copy lives elsewhere: make its relative paths absolute
        kept[column] = [str(cohort.out_dir / p) if isinstance(p, str) else p for p in kept[column]]
    kept.to_csv(out / "manifest_minus_one.csv", index=False)
    expression = pd.read_csv(cohort.out_dir / "expression.tsv", sep="\t", index_col=0)
    sample = next(c for c in expression.columns if c.startswith(held[:15]))
    expression.drop(columns=[sample]).to_csv(out / "expression_minus_one.tsv", sep="\t")
    return out / "manifest_minus_one.csv", out / "expression_minus_one.tsv", held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help="an empty folder to run in (default: a temporary one)")
    parser.add_argument("--heads-epochs", type=int, default=None, help="override heads.epochs (default: params)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import yaml

    from flows.pipeline import pipeline_flow
    from histcode.demo.build import build_demo_cohort
    from histcode.workspace import Workspace

    tmp = None if args.workspace else tempfile.TemporaryDirectory(prefix="histcode-bench-pipeline-")
    ws = Workspace((args.workspace or Path(tmp.name)).resolve()).ensure()
    if args.heads_epochs:
        (ws.root / "params.yaml").write_text(yaml.safe_dump({"heads": {"epochs": args.heads_epochs}}))
    cfg = ws.config()
    cohort = build_demo_cohort(cfg.demo, ws.path(cfg.demo.out_dir), workers=2, progress=False)
    manifest, expression, held = _hold_back_one_slide(cohort, ws.root)
    print(f"workspace {ws.root}; {cohort.n_slides} demo slides, first run without {held}", flush=True)

    def timed(label: str, **params) -> tuple[float, dict]:
        start = time.perf_counter()
        out = pipeline_flow(workspace=str(ws.root), **params)
        seconds = time.perf_counter() - start
        print(f"{label:<28} {seconds:8.1f} s", flush=True)
        return seconds, out

    first, out = timed("first run", manifest=str(manifest), expression=str(expression))
    again, _ = timed("unchanged rerun", manifest=str(manifest), expression=str(expression))
    encoder = f"{out['pretrain']['registered_model']}/{out['pretrain']['version']}"
    added, out2 = timed("one slide added", manifest=str(cohort.manifest), expression=str(cohort.out_dir / "expression.tsv"),
                        encoder=encoder)
    print()
    print(f"| run | wall time | ratio to the first run |\n|---|---|---|\n| first run ({cohort.n_slides - 1} slides) | "
          f"{first:.1f} s | 1 : 1 |\n| unchanged rerun | {again:.1f} s | {again / first:.3f} : 1 |\n"
          f"| one slide added (embedded {out2['embed']['slides_embedded']} slide, heads retrained) | {added:.1f} s | "
          f"{added / first:.3f} : 1 |")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
