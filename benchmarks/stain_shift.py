"""What a global, scanner-like stain shift costs the registered heads on slides they never saw.

    python benchmarks/stain_shift.py [--workspace DIR] [--patients 10] [--strengths 0 0.5 1 1.5 2] [--json FILE]

``--workspace`` is a workspace where ``histcode demo`` has run (heads registered); the benchmark works on a copy
of it in a temporary folder (the workspace is relocatable), never on the original. Without it the demo runs
first in a temporary workspace (``histcode.apps.demo.run_demo``, as ``histcode demo`` does).

A held-aside cohort is built into the temporary folder from the LC25000 ``val`` split (``demo.source_split:
val``: tiles no demo slide and no pretraining ever saw), with ``--patients`` patients, a seed other than the
demo's and every other setting the demo's. For each strength ``s`` every held-aside slide is read at level 0,
shifted with ``histcode.wsi.stain.scanner_shift`` (haematoxylin x (1 + 0.3 s), eosin x (1 - 0.25 s) in optical
density, RGB contrast x (1 - 0.15 s) about mid-grey) and written again with the demo's own writers, in its own
format and at its own mpp and JPEG quality, as a new slide id (``<slide>-shift<s>``); strength 0 is the same
rewrite without the shift, so every row went through one re-encoding. The copies are predicted exactly as
``histcode predict`` predicts (``histcode.apps.predict.predict_slides``, into the copy's inference cohort).

Per strength, from one run: the tumour-vs-normal AUC of ``p_tumor`` against the held-aside manifest's
``sample_type`` and its difference to strength 0, mean ``p_tumor`` on tumour and on normal slides, the mean over
tumour slides of the AUC of the tile attention (the tile scores' ``attention`` column) against the ground-truth
mask (a tile is tumour when at least half of it is tumour in the mask), how many slides were out of the training
distribution (``in_distribution`` false) and how many failed. Beside them: how many tumour and normal slides the
head calls tumour at p_tumor >= 0.5 (a shift can leave the ranking, the AUC, alone and still move every
probability across the threshold), and a 95% interval of the AUC difference by a paired bootstrap of patients
(the same resample at strength s and at 0). ``--json FILE`` keeps every figure, per-slide p_tumor and per-slide
mask AUC included.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0)


def copy_workspace(source: Path, dest: Path):
    """A copy of the workspace ``source`` at ``dest`` (the original is never opened for writing)."""
    from histcode.workspace import Workspace

    original = Workspace(source)
    if not original.catalog_path.is_file() or not (source / "mlruns").is_dir():
        raise SystemExit(f"{source}: not a workspace where `histcode demo` has run (no catalog or no mlruns)")
    shutil.copytree(source, dest, symlinks=True)
    return Workspace(dest.resolve()).ensure()


def demo_in(dest: Path):
    """A fresh workspace at ``dest`` with the whole demo run in it."""
    from histcode.apps.demo import run_demo
    from histcode.workspace import Workspace

    ws = Workspace(dest.resolve()).ensure()
    print(f"running the demo in {ws.root} ...", flush=True)
    outcome = run_demo(ws, ws.config(), workers=2)
    if outcome.failed:
        raise SystemExit("the demo run failed; see its log")
    return ws


def held_aside_cohort(ws, out_dir: Path, patients: int, seed: int | None):
    """The held-aside cohort (the val split) in ``out_dir``; the seed is moved on until no patient id is one of the
    workspace's training patients. Returns (cohort, its DemoConfig)."""
    import pandas as pd

    from histcode.demo.build import build_demo_cohort

    cfg = ws.config().demo
    source = ws.path(cfg.source_dir) if cfg.source_dir else None
    training = _training_patients(ws)
    seed = cfg.seed + 1000 if seed is None else seed
    if seed == cfg.seed:
        raise SystemExit(f"--seed {seed} is the demo's own seed: the held-aside cohort needs another")
    for _ in range(20):
        held_cfg = cfg.model_copy(update={"source_split": "val", "n_patients": patients, "seed": seed})
        cohort = build_demo_cohort(held_cfg, out_dir, source, progress=False, workers=2)
        clash = set(pd.read_csv(cohort.manifest).patient_id) & training
        if not clash:
            return cohort, held_cfg
        print(f"seed {seed}: patient ids {sorted(clash)} are training patients; next seed", flush=True)
        seed += 1
    raise SystemExit("no seed in 20 gave a held-aside cohort without training patient ids")


def _training_patients(ws) -> set[str]:
    import duckdb

    con = duckdb.connect(str(ws.catalog_path), read_only=True)
    try:
        return {r[0] for r in con.execute("SELECT DISTINCT patient_id FROM slides").fetchall()}
    finally:
        con.close()


def shifted_copy(src: Path, dst: Path, strength: float, fmt: str, mpp: float, magnification: int, quality: int,
                 name: str) -> Path:
    """Level 0 of ``src`` shifted by ``strength`` and written to ``dst`` with the demo's writer for ``fmt``."""
    import numpy as np
    import openslide

    from histcode.demo.tiff_writer import write_aperio_svs, write_generic_tiff
    from histcode.wsi.stain import scanner_shift

    with openslide.OpenSlide(str(src)) as slide:
        own = float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X, "nan"))
        if not math.isclose(own, mpp, rel_tol=1e-3):
            raise ValueError(f"{src}: OpenSlide reads {own} um/px, the manifest says {mpp}")
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    image = scanner_shift(rgb, strength)
    if fmt == "aperio":
        return write_aperio_svs(dst, image, mpp, magnification, quality, name)
    if fmt == "generic-tiff":
        return write_generic_tiff(dst, image, mpp, quality)
    raise ValueError(f"{src}: unknown demo format {fmt!r}")


def shifted_id(slide_id: str, strength: float) -> str:
    return f"{slide_id}-shift{strength:g}"


def mask_auc(row, tiles, cohort_dir: Path) -> float | None:
    """AUC of one slide's tile attention against its ground-truth tumour tiles (>= half the tile tumour); None
    without both kinds of tile or for a flat map."""
    import numpy as np
    from PIL import Image
    from sklearn.metrics import roc_auc_score

    from histcode.heads.masks import TUMOUR_LABEL
    from histcode.wsi.grid import tissue_fractions

    if tiles.empty:
        return None
    labels = np.asarray(Image.open(cohort_dir / row.mask)) == TUMOUR_LABEL
    sizes = tiles["size"].unique()
    if len(sizes) != 1:
        raise ValueError(f"{row.slide_id}: tiles of several sizes {sizes}")
    xy = tiles[["x", "y"]].to_numpy()
    truth = tissue_fractions(labels, float(row.mask_mpp) / float(row.mpp), xy, int(sizes[0])) >= 0.5
    scores = tiles["attention"].to_numpy(dtype=float)
    if truth.all() or not truth.any() or len(set(np.round(scores, 12))) < 2:
        return None
    return float(roc_auc_score(truth, scores))


def measure(predictions, tile_scores, slides, cohort_dir: Path, strength: float) -> dict:
    """The figures of one strength from its predictions, tile scores and the held-aside slides.csv."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    preds = predictions.set_index("slide_id")
    ok = preds[preds.status == "ok"]
    truth = {shifted_id(r.slide_id, strength): r for r in slides.itertuples()}
    y = np.array([truth[s].sample_type == "tumor" for s in ok.index], dtype=bool)
    p = ok.p_tumor.to_numpy(dtype=float)
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    by_slide = {sid: t for sid, t in tile_scores.groupby("slide_id")} if not tile_scores.empty else {}
    mask = {}
    for sid in ok.index[y]:
        value = mask_auc(truth[sid], by_slide.get(sid, tile_scores.iloc[0:0]), cohort_dir)
        if value is not None:
            mask[sid] = value
    return {
        "strength": strength, "slides": int(len(preds)), "ok": int(len(ok)),
        "failed": int((preds.status != "ok").sum()),
        "auc": auc, "p_tumor_tumour": float(p[y].mean()) if y.any() else float("nan"),
        "p_tumor_normal": float(p[~y].mean()) if (~y).any() else float("nan"),
        "tumour_called_tumour": int((p[y] >= 0.5).sum()), "normal_called_tumour": int((p[~y] >= 0.5).sum()),
        "p_tumor_per_slide": {truth[sid].slide_id: float(v) for sid, v in zip(ok.index, p)},
        "mask_auc": float(np.mean(list(mask.values()))) if mask else float("nan"), "mask_slides": len(mask),
        "out_of_distribution": int((ok.in_distribution == False).sum()),  # noqa: E712 -- a column of bools/NaN
        "ood_percentile_mean": float(ok.ood_percentile.astype(float).mean()),
        "failures": {sid: r for sid, r in preds[preds.status != "ok"].reason.items()},
        "mask_auc_per_slide": mask,
    }


def auc_difference_ci(rows: list[dict], slides, resamples: int = 2000, seed: int = 0) -> None:
    """A 95% interval of AUC(s) - AUC(0) by a paired bootstrap of patients (each patient's slides together, the
    same resample for both strengths), written into each row as ``auc_minus_s0_ci``."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    patients = sorted(slides.patient_id.unique())
    of_patient = {pid: slides.slide_id[slides.patient_id == pid].tolist() for pid in patients}
    tumour = dict(zip(slides.slide_id, slides.sample_type == "tumor"))
    draws = [[of_patient[patients[i]] for i in rng.integers(0, len(patients), len(patients))] for _ in range(resamples)]
    base = rows[0]["p_tumor_per_slide"]
    for row in rows:
        p = row["p_tumor_per_slide"]
        diffs = []
        for draw in draws:
            ids = [sid for group in draw for sid in group if sid in p and sid in base]
            y = np.array([tumour[sid] for sid in ids])
            if 0 < y.sum() < len(y):
                diffs.append(roc_auc_score(y, [p[sid] for sid in ids]) - roc_auc_score(y, [base[sid] for sid in ids]))
        row["auc_minus_s0_ci"] = [float(v) for v in np.percentile(diffs, [2.5, 97.5])] if diffs else [float("nan")] * 2


def _finite(value):
    """``value`` with NaN floats as None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help="a workspace where `histcode demo` has run (copied, never "
                        "written); default: run the demo in a temporary workspace first")
    parser.add_argument("--patients", type=int, default=10, help="patients of the held-aside cohort (default 10)")
    parser.add_argument("--strengths", type=float, nargs="+", default=list(DEFAULT_STRENGTHS),
                        help="shift strengths, 0 = none (added when missing: the differences are to it)")
    parser.add_argument("--seed", type=int, default=None, help="held-aside cohort seed (default: the demo's + 1000)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args()
    strengths = sorted(set(args.strengths) | {0.0})
    from histcode.wsi.stain import SCANNER_MAX_STRENGTH

    bad = [s for s in strengths if not 0 <= s <= SCANNER_MAX_STRENGTH]
    if bad:
        parser.error(f"--strengths must lie in [0, {SCANNER_MAX_STRENGTH:g}], got {bad}")
    if args.patients < 2:
        parser.error("--patients must be at least 2")

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("histcode.apps.predict").setLevel(logging.ERROR)  # out-of-distribution slides: counted below
    import pandas as pd

    from histcode.apps.predict import predict_slides
    from histcode.ingest.sources import patient_of, read_manifest
    from histcode.tracking import telemetry_off

    telemetry_off()
    start = time.perf_counter()
    stages: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="histcode-bench-stain-"))
    try:
        t0 = time.perf_counter()
        if args.workspace:
            ws = copy_workspace(args.workspace.resolve(), tmp / "ws")
            print(f"copied {args.workspace} to {ws.root}", flush=True)
        else:
            ws = demo_in(tmp / "ws")
        stages["workspace"] = time.perf_counter() - t0
        cfg = ws.config()

        t0 = time.perf_counter()
        cohort, held_cfg = held_aside_cohort(ws, tmp / "held_aside", args.patients, args.seed)
        slides = pd.read_csv(cohort.out_dir / "slides.csv")
        stages["held_aside_cohort"] = time.perf_counter() - t0
        n_tumour = int((slides.sample_type == "tumor").sum())
        print(f"held-aside cohort (val split, seed {held_cfg.seed}): {args.patients} patients, {len(slides)} slides "
              f"({n_tumour} tumour, {len(slides) - n_tumour} normal, {int(slides.small_focus.sum())} small-focus)",
              flush=True)

        rows, views = [], {}
        for strength in strengths:
            t0 = time.perf_counter()
            folder = tmp / "shifted" / f"s{strength:g}"
            folder.mkdir(parents=True)
            manifest = []
            for r in slides.itertuples():
                sid = shifted_id(r.slide_id, strength)
                dst = folder / f"{sid}{Path(r.path).suffix}"
                shifted_copy(cohort.out_dir / r.path, dst, strength, r.format, float(r.mpp), int(r.magnification),
                             held_cfg.jpeg_quality, sid)
                manifest.append({"path": str(dst), "slide_id": sid, "patient_id": patient_of(r.slide_id)})
            pd.DataFrame(manifest).to_csv(folder / "manifest.csv", index=False)
            written = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = predict_slides(ws, cfg, read_manifest(folder / "manifest.csv"), None, progress=False)
            predicted = time.perf_counter() - t0
            views.update(result.views)
            row = measure(result.predictions, result.tile_scores, slides, cohort.out_dir, strength)
            row.update(write_s=written, predict_s=predicted)
            rows.append(row)
            print(f"strength {strength:g}: {row['ok']} of {row['slides']} predicted, AUC {row['auc']:.3f}, "
                  f"written in {written:.0f} s, predicted in {predicted:.0f} s", flush=True)
        base = rows[0]
        for row in rows:
            row["auc_minus_s0"] = row["auc"] - base["auc"]
            row["mask_auc_minus_s0"] = row["mask_auc"] - base["mask_auc"]
        auc_difference_ci(rows, slides)
        wall = time.perf_counter() - start

        print()
        for head, view in views.items():
            print(f"{head}: view {view}")
        print(f"\nheld-aside slides ({len(slides)}: {n_tumour} tumour, {len(slides) - n_tumour} normal) under a "
              "scanner shift of strength s; AUC of p_tumor against sample_type; attention vs mask: mean over tumour "
              "slides")
        n_normal = len(slides) - n_tumour
        print("| s | AUC | AUC - AUC(s=0) [paired patient 95% CI] | mean p_tumor, tumour : normal | called tumour "
              "(p >= 0.5), tumour : normal | attention vs mask (slides) | - at s=0 | out of distribution "
              "| mean OOD percentile | failed |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            lo, hi = r["auc_minus_s0_ci"]
            print(f"| {r['strength']:g} | {r['auc']:.3f} | {r['auc_minus_s0']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                  f"{r['p_tumor_tumour']:.3f} : {r['p_tumor_normal']:.3f} | {r['tumour_called_tumour']}/{n_tumour} : "
                  f"{r['normal_called_tumour']}/{n_normal} | {r['mask_auc']:.3f} ({r['mask_slides']}) | "
                  f"{r['mask_auc_minus_s0']:+.3f} | {r['out_of_distribution']} of {r['ok']} | "
                  f"{r['ood_percentile_mean']:.2f} | {r['failed']} |")
        for r in rows:
            for sid, reason in r["failures"].items():
                print(f"  failed at s={r['strength']:g}: {sid}: {reason}")
        print(f"\nwall time {wall:.1f} s (workspace {stages['workspace']:.0f} s, held-aside cohort "
              f"{stages['held_aside_cohort']:.0f} s, writing {sum(r['write_s'] for r in rows):.0f} s, predicting "
              f"{sum(r['predict_s'] for r in rows):.0f} s)")
        if args.json:
            out = {"workspace": str(args.workspace) if args.workspace else None, "views": views,
                   "held_aside": {"seed": held_cfg.seed, "patients": args.patients, "slides": len(slides),
                                  "tumour_slides": n_tumour, "source_split": held_cfg.source_split},
                   "strengths": rows, "wall_s": wall, "stages_s": stages}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(_finite(out), indent=2, default=str))
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
