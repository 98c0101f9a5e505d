"""The demo cohort: real tiles, honest provenance, every format, deterministic, and tiled as its masks say;
hard in the ways real cohorts are: site stains independent of class, small foci, tumour at the tissue edge,
expression that follows the tumour's pixels."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import openslide
import pandas as pd
import pytest
from PIL import Image, ImageFilter
from scipy import ndimage

from histcode.config import DemoConfig
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
            assert row.tumour_fraction == 0 and not (labels == 2).any() and not row.small_focus
        else:
            measured = (labels == 2).sum() / (labels > 0).sum()
            assert measured == pytest.approx(row.tumour_fraction, abs=1e-3)
            if row.small_focus:  # one cell of at least half tissue; on this small canvas about 5% of the tissue
                assert 0 < measured <= 0.06 and row.tumour_tiles <= 2
            else:
                assert lo - 0.15 <= measured <= hi + 0.15
    assert slides.small_focus.sum() == round(TINY_DEMO.n_patients * TINY_DEMO.small_focus_share)


def test_expression_matrix_follows_composition(tiny_cohort, slides) -> None:
    expr = pd.read_csv(tiny_cohort.out_dir / "expression.tsv", sep="\t", index_col="gene")
    assert list(expr.index) == [g.gene for g in PANEL]
    assert set(expr.columns) == set(slides.expression_sample)
    for row in slides.itertuples():  # the site is the barcode's tissue-source-site field, in slide and sample
        assert re.fullmatch(rf"TCGA-{row.site}-\d{{4}}-(01|11)A-01R-{row.site}01-07", row.expression_sample)
        assert row.slide_id.startswith(f"TCGA-{row.site}-") and row.site in TINY_DEMO.sites
    assert (expr.values >= 0).all() and np.isfinite(expr.values).all()
    # SFTPC (alveolar) falls with tumour content: each tumour sample with a real region below its matched normal
    large = slides[(slides.sample_type == "normal") | (slides.tumour_fraction >= 0.25)]
    pairs = large.pivot_table(index="patient_id", columns="sample_type", values="expression_sample", aggfunc="first").dropna()
    assert len(pairs) > 0
    for tumour_col, normal_col in zip(pairs["tumor"], pairs["normal"]):
        assert expr.loc["SFTPC", tumour_col] < expr.loc["SFTPC", normal_col]
    genes = pd.read_csv(tiny_cohort.out_dir / "genes.csv")
    assert set(genes[~genes.morphological_signal].gene) == {"KRAS", "STK11", "KEAP1", "PIK3CA", "GAPDH", "ACTB"}
    assert set(genes[(genes.effect_nuclear_density != 0) | (genes.effect_nuclear_area != 0)].gene) == {
        "MKI67", "TOP2A", "EGFR", "CDKN2A", "TP53"}
    from histcode.config import LabelsConfig
    from histcode.labels.genes import gene_table_path, resolve_control_genes

    # the heads score the demo's signal-free panel genes apart: with the default config, label ingest resolves the
    # controls from the genes.csv beside the matrix, and they are exactly those
    labels = LabelsConfig()
    table = gene_table_path(None, tiny_cohort.out_dir / "expression.tsv")
    assert table == tiny_cohort.out_dir / "genes.csv"
    controls = resolve_control_genes(labels, table)
    assert controls.genes and set(controls.genes) == set(genes[~genes.morphological_signal].gene) & set(labels.panel)


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


# ---- the hard cases: sites and stains, small foci, tumour at the edge, pixel-driven expression --------------

# Larger canvas than the tiny cohort (so a small focus can be ~2% of the tissue), half the tumour slides small
# foci, 20x Aperio only (the formats are tested above).
HARD_DEMO = DemoConfig(n_patients=6, canvas_cells=(8, 10), seed=3, small_focus_share=0.5, fraction_40x=0.0,
                       fraction_generic_tiff=0.0)


@pytest.fixture(scope="module")
def hard_cohort(tmp_path_factory):
    return build_demo_cohort(HARD_DEMO, tmp_path_factory.mktemp("hard") / "demo", progress=False)


@pytest.fixture(scope="module")
def hard_slides(hard_cohort) -> pd.DataFrame:
    return pd.read_csv(hard_cohort.out_dir / "slides.csv", keep_default_na=False)


def test_sites_are_in_the_barcodes_and_independent_of_class() -> None:
    from histcode.demo.plan import load_source_tiles, plan_cohort, site_of

    cfg = DemoConfig()
    plans, _ = plan_cohort(cfg, load_source_tiles(bundled_source_dir()))  # the default cohort's plan
    tumour = pd.DataFrame([{"site": p.site, "subtype": p.subtype, "patient": p.patient_id, "focus": p.small_focus}
                           for p in plans if p.sample_type == "tumor"])
    assert all(p.site == site_of(p.patient_id) == p.slide_id.split("-")[1] for p in plans)
    assert set(tumour.site) == set(cfg.sites)
    counts = pd.crosstab(tumour.site, tumour.subtype)
    assert (counts.max(axis=1) - counts.min(axis=1)).max() <= 1  # every site holds both subtypes, balanced
    # the site's stain is one per site, whatever the slide's class; slides add their own jitter
    for site in cfg.sites:
        mine = [p for p in plans if p.site == site]
        assert len({p.site_stain for p in mine}) == 1 and len({p.stain for p in mine}) == len(mine)
        assert {p.sample_type for p in mine} == {"tumor", "normal"}
    assert len({p.site_stain for p in plans}) == len(cfg.sites)
    # small foci are dealt at random too: both subtypes
    assert set(tumour[tumour.focus].subtype) == {"LUAD", "LUSC"}


def test_restaining_with_identity_returns_the_input_and_follows_beer_lambert() -> None:
    from histcode.demo.pixels import read_rgb
    from histcode.wsi.stain import RUIFROK, StainParams, od_to_rgb, restain

    labels = pd.read_csv(bundled_source_dir() / "labels.csv")
    for path in labels.groupby("label").path.first():
        rgb = read_rgb(bundled_source_dir() / path)
        assert np.abs(restain(rgb, StainParams()).astype(int) - rgb).max() <= 1
    # a hand-made H&E image: known concentrations of the reference stains, in OD space
    rng = np.random.default_rng(0)
    conc = rng.uniform(0, 1.2, size=(64, 64, 2))
    rgb = od_to_rgb(conc @ RUIFROK)
    stretched = StainParams(h_scale=1.5, e_scale=0.6)
    expected = od_to_rgb((conc * [1.5, 0.6]) @ RUIFROK)
    assert np.abs(restain(rgb, stretched).astype(int) - expected).max() <= 2
    # a turned stain: only the H vector moves, by the angle asked for
    turned = StainParams(h_angle=8.0, h_azimuth=40.0).vectors()
    assert np.degrees(np.arccos(turned[0] @ RUIFROK[0])) == pytest.approx(8.0, abs=0.05)
    assert np.allclose(turned[1], RUIFROK[1])
    hue = restain(od_to_rgb(conc[..., :1] * RUIFROK[0]), StainParams(h_angle=8.0, h_azimuth=40.0))
    assert np.abs(hue.astype(int) - od_to_rgb(conc[..., :1] * turned[0])).max() <= 2


def _benign_od(cohort, row) -> np.ndarray:
    """Mean OD per channel of a slide's benign tissue, read back from the slide file at 1/4 resolution."""
    from histcode.wsi.stain import rgb_to_od

    with openslide.OpenSlide(cohort.out_dir / row.path) as s:
        level = s.get_best_level_for_downsample(4)
        image = np.asarray(s.read_region((0, 0), level, s.level_dimensions[level]).convert("RGB"))
    benign = Image.fromarray((np.asarray(Image.open(cohort.out_dir / row.mask)) == 1).astype(np.uint8) * 255)
    benign = benign.resize(image.shape[1::-1], Image.Resampling.NEAREST)
    inside = np.asarray(benign.filter(ImageFilter.MinFilter(9))) > 0  # away from the glass and the tumour
    return rgb_to_od(image[inside]).mean(axis=0)


def test_stain_differs_by_site_not_by_slide(hard_cohort, hard_slides) -> None:
    od = np.array([_benign_od(hard_cohort, row) for row in hard_slides.itertuples()])
    sites = hard_slides.site.to_numpy()
    # between-site spread of the benign tissue's optical density well above the spread within a site
    grand = od.mean(axis=0)
    between = sum((sites == s).sum() * ((od[sites == s].mean(axis=0) - grand) ** 2).sum() for s in set(sites))
    within = sum(((od[sites == s] - od[sites == s].mean(axis=0)) ** 2).sum() for s in set(sites))
    f = (between / (len(set(sites)) - 1)) / (within / (len(od) - len(set(sites))))
    assert f > 4, f


def test_the_recorded_stain_is_the_one_on_the_slide(hard_cohort, hard_slides) -> None:
    from histcode.demo.compose import _dihedral
    from histcode.demo.pixels import read_rgb
    from histcode.wsi.stain import StainParams, restain, rgb_to_od

    prov = pd.read_csv(hard_cohort.out_dir / "provenance.csv")
    white = json.loads((hard_cohort.out_dir / "cohort.json").read_text())["white_point_od"]
    source = {p.split("/")[-1]: bundled_source_dir() / p for p in pd.read_csv(bundled_source_dir() / "labels.csv").path}
    fields = ("h_scale", "e_scale", "h_angle", "h_azimuth", "e_angle", "e_azimuth")
    for row in hard_slides.itertuples():
        stain = StainParams(**{f: float(getattr(row, f"stain_{f}")) for f in fields})
        cell = prov[(prov.slide_id == row.slide_id) & (prov.tissue_share == 1)].iloc[0]
        with openslide.OpenSlide(hard_cohort.out_dir / row.path) as s:
            on_slide = np.asarray(s.read_region((int(cell.col) * 224, int(cell.row) * 224), 0, (224, 224)).convert("RGB"))
        rgb = read_rgb(source[cell.source])
        balance = np.minimum(np.percentile(rgb_to_od(rgb).reshape(-1, 3), 1, axis=0), white[cell.label])
        expected = _dihedral(restain(rgb, stain, balance), int(cell.dihedral)).astype(int)
        error = np.abs(on_slide.astype(int) - expected).mean()
        assert error < 3, (row.slide_id, error)  # JPEG at quality 85
        assert np.abs(on_slide.astype(int) - _dihedral(rgb, int(cell.dihedral))).mean() > 2 * error  # not the source
        assert np.asarray(on_slide).reshape(-1, 3).mean(axis=0) == pytest.approx(
            cell[["mean_r", "mean_g", "mean_b"]].to_numpy(float), abs=2)


def test_small_foci_at_the_edge_and_masks_match_the_placed_tiles(hard_cohort, hard_slides) -> None:
    prov = pd.read_csv(hard_cohort.out_dir / "provenance.csv")
    cell_px = round(HARD_DEMO.tile_um / HARD_DEMO.mask_mpp)
    touching = 0
    for row in hard_slides.itertuples():
        labels = np.asarray(Image.open(hard_cohort.out_dir / row.mask))
        cells = prov[prov.slide_id == row.slide_id]
        placed = np.zeros((HARD_DEMO.canvas_cells[0], HARD_DEMO.canvas_cells[1]), dtype=bool)
        placed[cells[cells.kind == "tumour"].row, cells[cells.kind == "tumour"].col] = True
        expected = np.kron(placed, np.ones((cell_px, cell_px), dtype=bool)) & (labels > 0)
        assert ((labels == 2) == expected).all(), row.slide_id  # tumour in the mask exactly where tumour tiles are
        assert row.tumour_tiles == placed.sum()
        if row.small_focus:  # one focus, not scattered tiles
            assert ndimage.label(placed)[1] == 1, row.slide_id
        tumour = labels == 2
        glass = np.pad(labels == 0, 1, constant_values=True)
        next_to_glass = glass[:-2, 1:-1] | glass[2:, 1:-1] | glass[1:-1, :-2] | glass[1:-1, 2:]
        touching += bool((tumour & next_to_glass).any())
    tumour = hard_slides[hard_slides.sample_type == "tumor"]
    small = tumour[tumour.small_focus.astype(bool)]
    assert len(small) == 3 and (small.tumour_fraction <= 0.06).all() and small.tumour_fraction.min() <= 0.035
    assert (small.tumour_tiles <= 3).all() and (tumour[~tumour.small_focus.astype(bool)].tumour_fraction >= 0.09).all()
    assert touching >= 2  # tumour reaches the tissue's edge on some slides: "touches glass" is no tell


def test_nuclear_measures_come_from_the_placed_source_pixels(hard_cohort, hard_slides) -> None:
    from histcode.demo.pixels import nuclear_measures, read_rgb
    from histcode.wsi.stain import rgb_to_od

    prov = pd.read_csv(hard_cohort.out_dir / "provenance.csv")
    source = {p.split("/")[-1]: bundled_source_dir() / p for p in pd.read_csv(bundled_source_dir() / "labels.csv").path}
    summary = json.loads((hard_cohort.out_dir / "cohort.json").read_text())
    white = summary["white_point_od"]
    for cell in prov[prov.kind == "tumour"].groupby("slide_id").head(2).itertuples():
        rgb = read_rgb(source[cell.source])
        own = np.percentile(rgb_to_od(rgb).reshape(-1, 3), 1, axis=0)  # the tile's own white point
        density, area = nuclear_measures(rgb, np.minimum(own, white[cell.label]))
        assert (cell.nuclear_density, cell.nuclear_area) == pytest.approx((density, area), abs=0.1)
    for row in hard_slides[hard_slides.sample_type == "tumor"].itertuples():
        cells = prov[(prov.slide_id == row.slide_id) & (prov.kind == "tumour")]
        assert float(row.nuclear_density) == pytest.approx(np.average(cells.nuclear_density, weights=cells.tissue_share),
                                                           abs=0.01)
    # patients' tumours differ in them (tumour pools are dealt by measured phenotype)
    z = hard_slides[hard_slides.sample_type == "tumor"].nuclear_density_z.astype(float)
    assert z.max() - z.min() > 1.0


def test_pixel_genes_follow_the_pixels_and_null_genes_follow_nothing() -> None:
    from histcode.demo.expression import SampleSpec, simulate_expression

    rng = np.random.default_rng(5)
    n = 400
    samples, tf, dz, az = [], rng.uniform(0.02, 0.7, n), rng.normal(0, 1, n), rng.normal(0, 1, n)
    for i in range(n):
        aca = tf[i] if i % 2 else 0.0
        samples.append(SampleSpec(f"TCGA-HC-{i:04d}-01A-01R-HC01-07", f"TCGA-HC-{i:04d}", True, aca, tf[i] - aca,
                                  float(dz[i]), float(az[i])))
    log2 = np.log2(simulate_expression(samples, np.random.default_rng(6), 0.3) + 1)
    # beyond subtype and tumour fraction: the residual after both follows the tumour's pixels
    design = np.column_stack([np.ones(n), tf, [s.aca_fraction for s in samples]])

    def residual(gene):
        y = log2.loc[gene].to_numpy()
        return y - design @ np.linalg.lstsq(design, y, rcond=None)[0]

    noise = 3 / np.sqrt(n)
    for gene in ("MKI67", "TOP2A"):
        assert np.corrcoef(residual(gene), tf * dz)[0, 1] > 0.5
        assert abs(np.corrcoef(residual(gene), tf * az)[0, 1]) < noise
    assert np.corrcoef(residual("CDKN2A"), tf * az)[0, 1] > 0.5
    for gene in ("KRAS", "STK11", "KEAP1", "PIK3CA", "GAPDH", "ACTB"):
        y = log2.loc[gene].to_numpy()
        for x in (tf, tf * dz, tf * az):
            assert abs(np.corrcoef(y, x)[0, 1]) < noise, gene


def test_colour_shortcut_is_smaller_than_in_the_source_tiles(hard_cohort, tiny_cohort) -> None:
    from histcode.demo.shortcut import colour_shortcut_auc

    rng = np.random.default_rng(0)
    y = np.repeat([True, False], 50)
    groups = np.tile(np.arange(10), 10)
    assert colour_shortcut_auc(np.where(y[:, None], 200.0, 100.0) + rng.normal(0, 1, (100, 3)), y, groups) == 1.0
    assert 0.3 < colour_shortcut_auc(rng.normal(0, 1, (100, 3)), y, groups) < 0.7
    with pytest.raises(ValueError, match="both classes"):
        colour_shortcut_auc(rng.normal(0, 1, (100, 3)), np.ones(100, bool), groups)
    for cohort in (hard_cohort, tiny_cohort):
        auc = json.loads((cohort.out_dir / "cohort.json").read_text())["colour_shortcut_auc"]
        assert auc["placed"] < auc["photographed"], auc
