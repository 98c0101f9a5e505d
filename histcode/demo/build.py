"""Build the demo cohort: slides, ground-truth masks, labels, a TCGA-style expression matrix, a GDC-style
clinical TSV of simulated survival, a manifest.

Deterministic from ``demo.seed``. The slides are composed of the LC25000 tiles of ``demo.source_split``:
``train`` for the demo itself, ``val`` for held-aside slides whose tiles no demo slide (and no pretraining)
ever saw. Built in a sibling temporary folder and swapped into place, so the output is either the previous
cohort or the complete new one. A rebuild with the same parameters, the same source tiles and the same builder
version does nothing.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from histcode.config import DemoConfig, stable_hash
from histcode.demo.compose import BASE_MPP, compose_slide, upsample
from histcode.demo.expression import SampleSpec, panel_table, simulate_expression
from histcode.demo.pixels import SourceMeasures, measure_sources
from histcode.demo.plan import SlidePlan, load_source_tiles, plan_cohort, sample_barcode
from histcode.demo.readme import cohort_readme
from histcode.demo.shortcut import cohort_shortcut
from histcode.demo.survival import clinical_tsv, simulate_survival
from histcode.demo.tiff_writer import write_aperio_svs, write_generic_tiff
from histcode.workspace import bundled_source_dir

log = logging.getLogger(__name__)

BUILDER_VERSION = "5"  # 5: simulated survival (clinical.tsv)
MASK_PALETTE = [243, 241, 242, 60, 170, 90, 210, 40, 60]  # glass, benign tissue, tumour


@dataclass
class DemoCohort:
    out_dir: Path
    n_patients: int
    n_slides: int
    built: bool  # False when an identical cohort was already there

    @property
    def manifest(self) -> Path:
        return self.out_dir / "manifest.csv"


def _fingerprint(cfg: DemoConfig, source_dir: Path) -> str:
    labels = (source_dir / "labels.csv").read_bytes()
    exclude = {"out_dir", "source_dir", "cohort"}
    if cfg.source_split == "train":  # the default: cohorts built before the field existed stay up to date
        exclude.add("source_split")
    return stable_hash({"builder": BUILDER_VERSION, "cfg": cfg.model_dump(mode="json", exclude=exclude),
                        "labels": stable_hash(labels.decode())})


def _check_geometry(cfg: DemoConfig) -> None:
    ratio = cfg.tile_um / cfg.mask_mpp
    if abs(ratio - round(ratio)) > 1e-9:
        raise ValueError(f"demo.tile_um ({cfg.tile_um}) must be a whole multiple of demo.mask_mpp ({cfg.mask_mpp})")


def _write_slide(plan: SlidePlan, image: np.ndarray, folder: Path, quality: int) -> Path:
    path = folder / plan.filename
    if plan.magnification == 40:
        image = upsample(image, 2)
    if plan.fmt == "aperio":
        return write_aperio_svs(path, image, plan.mpp, plan.magnification, quality, plan.slide_id)
    return write_generic_tiff(path, image, plan.mpp, quality)


def _save_mask(labels: np.ndarray, path: Path) -> None:
    image = Image.fromarray(labels, mode="P")
    image.putpalette(MASK_PALETTE)
    image.save(path)


def _tumour_measures(cells: list[dict], plan: SlidePlan, measures: SourceMeasures) -> dict[str, float]:
    """The slide's tumour tiles' nuclear measures, weighted by how much tissue each cell holds, raw and as
    z-scores of the patient's tumour class (what the expression model reads)."""
    tumour = [c for c in cells if c["kind"] == "tumour" and c["tissue_share"] > 0]
    out = {"nuclear_density": float("nan"), "nuclear_area": float("nan"), "nuclear_density_z": 0.0,
           "nuclear_area_z": 0.0}
    if plan.sample_type != "tumor" or not tumour:
        return out
    w = np.array([c["tissue_share"] for c in tumour])
    label = tumour[0]["label"]
    for m in ("nuclear_density", "nuclear_area"):
        value = float(np.average([c[m] for c in tumour], weights=w))
        out[m] = round(value, 2)
        out[f"{m}_z"] = round(measures.z(label, m, value), 4)
    return out


def _build_slide(plan: SlidePlan, pool: dict, cfg: DemoConfig, work: Path,
                 measures: SourceMeasures) -> tuple[dict, list[dict], SampleSpec]:
    """Compose and write one slide and its mask; returns its slides.csv row, provenance and expression sample."""
    tiles = {str(t.path): measures.tiles[str(t.path)] for kind in pool.values() for t in kind}
    composed = compose_slide(plan, pool, cfg.canvas_cells, cfg.tile_um, cfg.mask_mpp, tiles)
    path = _write_slide(plan, composed.image, work / "slides", cfg.jpeg_quality)
    labels = composed.layout.label_mask()
    _save_mask(labels, work / "masks" / f"{plan.slide_id}.png")
    tumour = composed.layout.tumour_fraction()
    aca = tumour if plan.subtype == "LUAD" else 0.0
    scc = tumour if plan.subtype == "LUSC" else 0.0
    barcode = sample_barcode(plan.patient_id, plan.sample_type)
    nuclear = _tumour_measures(composed.provenance, plan, measures)
    row = {
        "slide_id": plan.slide_id, "patient_id": plan.patient_id, "sample_type": plan.sample_type,
        "subtype": plan.subtype if plan.sample_type == "tumor" else "", "patient_subtype": plan.subtype,
        "site": plan.site, "format": plan.fmt, "magnification": plan.magnification, "mpp": plan.mpp,
        "tumour_fraction": round(tumour, 4), "aca_fraction": round(aca, 4), "scc_fraction": round(scc, 4),
        "small_focus": plan.small_focus, "tumour_tiles": sum(c["kind"] == "tumour" for c in composed.provenance),
        "tissue_fraction_of_canvas": round(float((labels > 0).mean()), 4),
        **nuclear, **plan.stain.record("stain_"), **plan.site_stain.record("site_stain_"),
        "path": f"slides/{path.name}", "mask": f"masks/{plan.slide_id}.png", "mask_mpp": cfg.mask_mpp,
        "expression_sample": barcode,
    }
    sample = SampleSpec(barcode, plan.patient_id, plan.sample_type == "tumor", aca, scc,
                        nuclear["nuclear_density_z"], nuclear["nuclear_area_z"])
    return row, composed.provenance, sample


def _map(fn, jobs: list[tuple], workers: int):
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield fn(*job)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        yield from pool.map(fn, *zip(*jobs))


def build_demo_cohort(cfg: DemoConfig, out_dir: Path, source_dir: Path | None = None, force: bool = False,
                      progress: bool = True, workers: int = 1) -> DemoCohort:
    """Build (or confirm up to date) the demo cohort in ``out_dir``; ``workers`` slide processes."""
    _check_geometry(cfg)
    source_dir = source_dir or bundled_source_dir()
    fingerprint = _fingerprint(cfg, source_dir)
    stamp = out_dir / "cohort.json"
    if not force and stamp.is_file():
        previous = json.loads(stamp.read_text())
        if previous.get("fingerprint") == fingerprint and all((out_dir / p).is_file() for p in previous.get("files", [])):
            log.info("demo cohort in %s is up to date (fingerprint %s)", out_dir, fingerprint)
            return DemoCohort(out_dir, previous["n_patients"], previous["n_slides"], built=False)

    tiles = load_source_tiles(source_dir, cfg.source_split)  # "val": held-aside slides, of tiles no demo slide holds
    measures = measure_sources(tiles, cfg.white_balance)
    plans, pools = plan_cohort(cfg, tiles, measures)
    work = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(work, ignore_errors=True)
    (work / "slides").mkdir(parents=True)
    (work / "masks").mkdir()

    slide_rows, provenance, samples = [], [], []
    jobs = [(plan, pools[plan.patient_id], cfg, work, measures) for plan in plans]
    for row, cells, sample in tqdm(_map(_build_slide, jobs, workers), total=len(jobs), desc="demo slides",
                                   unit="slide", disable=not progress):
        slide_rows.append(row)
        provenance.extend(cells)
        samples.append(sample)
    slide_rows.sort(key=lambda r: r["slide_id"])
    samples.sort(key=lambda s: s.barcode)

    slides = pd.DataFrame(slide_rows)
    slides[["slide_id", "patient_id", "path", "sample_type", "subtype", "mask", "mask_mpp", "site", "tumour_fraction",
            "small_focus"]].to_csv(work / "manifest.csv", index=False)
    slides.to_csv(work / "slides.csv", index=False)
    cells = pd.DataFrame(provenance)
    cells.to_csv(work / "provenance.csv", index=False)
    shortcut = cohort_shortcut(cells, slides, {t.path.name: measures.tiles[str(t.path)].mean_rgb for t in tiles})
    expression = simulate_expression(samples, np.random.default_rng(cfg.seed + 1), cfg.expression_noise_sd)
    expression.to_csv(work / "expression.tsv", sep="\t")
    panel_table().to_csv(work / "genes.csv", index=False)
    survival_rng = np.random.default_rng(cfg.seed + 2)  # its own stream: the slides and expression stay as they were
    survival = simulate_survival(slides, cfg, survival_rng)
    survival.to_csv(work / "survival.csv", index=False)  # the truth, with each patient's simulated log-hazard
    clinical_tsv(survival, survival_rng).to_csv(work / "clinical.tsv", sep="\t", index=False)
    (work / "README.md").write_text(cohort_readme(cfg, slides, BASE_MPP, shortcut, measures.white_od))
    files = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    summary = {
        "fingerprint": fingerprint, "builder_version": BUILDER_VERSION, "config": cfg.model_dump(mode="json"),
        "n_patients": cfg.n_patients, "n_slides": len(plans), "colour_shortcut_auc": shortcut,
        "white_point_od": measures.white_od, "plans": [asdict(p) for p in plans], "files": files,
    }
    (work / "cohort.json").write_text(json.dumps(summary, indent=1))

    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        work.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work.rename(out_dir)
    log.info("demo cohort: %d patients, %d slides in %s", cfg.n_patients, len(plans), out_dir)
    return DemoCohort(out_dir, cfg.n_patients, len(plans), built=True)
