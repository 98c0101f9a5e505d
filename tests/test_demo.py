"""The demo cohort: real tiles, honest provenance, every format, deterministic, and tiled as its masks say."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import openslide
import pandas as pd
import pytest
from PIL import Image

from histcode.demo.build import build_demo_cohort
from histcode.workspace import bundled_source_dir
from histcode.demo.expression import PANEL
from histcode.ingest.run import ingest_sources
from histcode.ingest.sources import read_manifest
from histcode.store.catalog import Catalog
from histcode.tiling.run import tile_slides
from histcode.wsi.grid import grid_positions, tile_size_level0, tissue_fractions
from tests.conftest import TINY_DEMO


@pytest.fixture(scope="module")
def slides(tiny_cohort) -> pd.DataFrame:
    return pd.read_csv(tiny_cohort.out_dir / "slides.csv", keep_default_na=False)


def test_cohort_files_and_formats(tiny_cohort, slides) -> None:
    out = tiny_cohort.out_dir
    for name in ("manifest.csv", "slides.csv", "expression.tsv", "genes.csv", "provenance.csv", "README.md", "cohort.json"):
        assert (out / name).is_file(), name
    assert "Real pixels, simulated layout, labels and expression" in (out / "README.md").read_text()
    tumour = slides[slides.sample_type == "tumor"]
    assert len(tumour) == TINY_DEMO.n_patients and set(tumour.subtype) == {"LUAD", "LUSC"}
    assert 0 < (slides.sample_type == "normal").sum() < TINY_DEMO.n_patients
    assert set(zip(slides.format, slides.magnification)) == {("aperio", 20), ("aperio", 40), ("generic-tiff", 20)}
    for row in slides.itertuples():
        with openslide.OpenSlide(out / row.path) as s:
            vendor = s.properties["openslide.vendor"]
            assert vendor == row.format
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(row.mpp, rel=1e-3)
            assert s.level_count >= 2 and s.properties["openslide.level[0].tile-width"] == "256"
            if vendor == "aperio":
                assert s.properties["openslide.objective-power"] == str(row.magnification)
            # 40x slides hold the same physical area as 20x ones: twice the pixels per side
            assert s.dimensions[0] * row.mpp == pytest.approx(TINY_DEMO.canvas_cells[1] * TINY_DEMO.tile_um)


def test_groups_never_cross_patients_and_val_split_is_held_aside(tiny_cohort, slides) -> None:
    prov = pd.read_csv(tiny_cohort.out_dir / "provenance.csv")
    patients = prov.merge(slides[["slide_id", "patient_id"]], on="slide_id")
    assert patients.groupby("group_id").patient_id.nunique().max() == 1
    labels = pd.read_csv(bundled_source_dir() / "labels.csv")
    val = set(labels[labels.split == "val"].path.str.split("/").str[-1])
    assert not val & set(prov.source)
    # tumour cells hold the patient's subtype, benign cells benign lung
    merged = prov.merge(slides[["slide_id", "patient_subtype"]], on="slide_id")
    tumour = merged[merged.kind == "tumour"]
    assert (tumour.label == tumour.patient_subtype.map({"LUAD": "lung_aca", "LUSC": "lung_scc"})).all()
    assert (merged[merged.kind == "normal"].label == "lung_n").all()


def test_masks_and_tumour_fractions(tiny_cohort, slides) -> None:
    lo, hi = TINY_DEMO.tumour_fraction
    for row in slides.itertuples():
        labels = np.asarray(Image.open(tiny_cohort.out_dir / row.mask))
        assert set(np.unique(labels)) <= {0, 1, 2}
        if row.sample_type == "normal":
            assert row.tumour_fraction == 0 and not (labels == 2).any()
        else:
            measured = (labels == 2).sum() / (labels > 0).sum()
            assert measured == pytest.approx(row.tumour_fraction, abs=1e-3)
            assert lo - 0.15 <= measured <= hi + 0.15


def test_expression_matrix_follows_composition(tiny_cohort, slides) -> None:
    expr = pd.read_csv(tiny_cohort.out_dir / "expression.tsv", sep="\t", index_col="gene")
    assert list(expr.index) == [g.gene for g in PANEL]
    assert set(expr.columns) == set(slides.expression_sample)
    assert all(re.fullmatch(r"TCGA-HC-\d{4}-(01|11)A-01R-HC01-07", c) for c in expr.columns)
    assert (expr.values >= 0).all() and np.isfinite(expr.values).all()
    # SFTPC (alveolar) falls with tumour content: each tumour sample below its matched normal
    pairs = slides.pivot_table(index="patient_id", columns="sample_type", values="expression_sample", aggfunc="first").dropna()
    assert len(pairs) > 0
    for tumour_col, normal_col in zip(pairs["tumor"], pairs["normal"]):
        assert expr.loc["SFTPC", tumour_col] < expr.loc["SFTPC", normal_col]
    genes = pd.read_csv(tiny_cohort.out_dir / "genes.csv")
    assert set(genes[~genes.morphological_signal].gene) == {"KRAS", "STK11", "KEAP1", "PIK3CA", "GAPDH", "ACTB"}
    from histcode.config import LabelsConfig

    # the heads score the demo's signal-free panel genes apart: the default controls are exactly those
    labels = LabelsConfig()
    assert set(labels.control_genes) == set(genes[~genes.morphological_signal].gene) & set(labels.panel)


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != "cohort.json"}


def test_deterministic_and_rebuild_is_a_no_op(tiny_cohort, tmp_path) -> None:
    again = build_demo_cohort(TINY_DEMO, tmp_path / "demo", progress=False, workers=2)
    assert again.built and _digest(again.out_dir) == _digest(tiny_cohort.out_dir)
    stamp = (again.out_dir / "cohort.json").stat().st_mtime_ns
    assert not build_demo_cohort(TINY_DEMO, again.out_dir, progress=False).built
    assert (again.out_dir / "cohort.json").stat().st_mtime_ns == stamp
    other = build_demo_cohort(TINY_DEMO.model_copy(update={"seed": 8}), tmp_path / "demo", progress=False)
    assert other.built and _digest(other.out_dir) != _digest(tiny_cohort.out_dir)
    assert not list(tmp_path.glob(".demo.*"))  # no half-built or old folders left behind


def test_more_patients_than_source_groups_is_refused(tmp_path) -> None:
    from histcode.demo.plan import DemoSourceError

    with pytest.raises(DemoSourceError, match="only 179 lung_n groups"):
        build_demo_cohort(TINY_DEMO.model_copy(update={"n_patients": 200}), tmp_path / "demo", progress=False)
    assert not list(tmp_path.iterdir())  # nothing half-built left behind


def test_ingest_and_tile_agree_with_ground_truth(tiny_cohort, slides, workspace, config) -> None:
    catalog = Catalog(workspace.catalog_path)
    ingest = ingest_sources(read_manifest(tiny_cohort.manifest), catalog, config.ingest, progress=False)
    assert not ingest.failed and len(ingest.outcomes) == len(slides)
    report = tile_slides(catalog, config.tiling, workspace.outputs_dir / "qc", progress=False)
    assert not report.failed
    tiles = catalog.tiles().to_pandas()
    for row in slides.itertuples():
        labels = np.asarray(Image.open(tiny_cohort.out_dir / row.mask))
        meta = catalog.get_slide(row.slide_id)
        size = tile_size_level0(256, 0.5, row.mpp)
        pos = grid_positions(meta["width"], meta["height"], size)
        truth = tissue_fractions(labels > 0, row.mask_mpp / row.mpp, pos, size) >= 0.5
        expected = set(map(tuple, pos[truth]))
        got = set(zip(tiles[tiles.slide_id == row.slide_id].x, tiles[tiles.slide_id == row.slide_id].y))
        assert len(expected & got) / len(expected | got) >= 0.85, row.slide_id
        assert (tiles[tiles.slide_id == row.slide_id]["size"] == size).all()
