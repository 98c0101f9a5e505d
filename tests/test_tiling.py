"""Tiling on real and synthetic slides: counts, failures with reasons, idempotence, spec versioning, scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from histcode.config import TileQCConfig, TilingConfig
from histcode.ingest.run import ingest_sources
from histcode.ingest.sources import sources_from_paths
from histcode.store.catalog import Catalog, CatalogError
from histcode.tiling.run import tile_slides
from histcode.tiling.spec import spec_id_of
from histcode.wsi.reader import OpenSlideReader, plan_read, read_square
from tests.conftest import SLIDES
from tests.helpers import glass, slide_with_rect, write_svs, write_tiff


def setup(paths, workspace, config) -> Catalog:
    catalog = Catalog(workspace.catalog_path)
    ingest_sources(sources_from_paths(list(paths), config.ingest.extensions), catalog, config.ingest, progress=False)
    return catalog


def run(catalog, workspace, cfg: TilingConfig, **kw):
    return tile_slides(catalog, cfg, workspace.outputs_dir / "qc", progress=False, **kw)


def outcome(report, slide_id):
    return next(o for o in report.outcomes if o.slide_id == slide_id)


def test_cmu1_small_region_tile_count(workspace, config, cmu_slide) -> None:
    catalog = setup([cmu_slide, SLIDES / "small.svs"], workspace, config)
    report = run(catalog, workspace, config.tiling)
    cmu = outcome(report, "CMU-1-Small-Region")
    # 2220 x 2967 px at 0.499 um/px -> 257 px tiles, an 8 x 11 grid. Counted by eye on the QC picture: 35 grid
    # squares are at least half covered by the tissue strip; the +-3 allows for the frayed borderline squares.
    assert cmu.n_candidates == 88
    assert 32 <= cmu.n_tiles <= 38
    tiles = catalog.tiles(slide_id="CMU-1-Small-Region").to_pandas()
    assert len(tiles) == cmu.n_tiles and tiles.tile_id.is_unique
    assert (tiles["size"] == 257).all() and (tiles.tissue_fraction >= 0.5).all()
    assert ((tiles.x % 257) == 0).all() and ((tiles.y % 257) == 0).all()
    small = outcome(report, "small")
    assert small.status == "failed" and small.reason == "slide 16x16 px is smaller than one tile (257 px at level 0)"
    qc = workspace.outputs_dir / "qc" / report.spec_id
    assert (qc / "CMU-1-Small-Region.qc.png").is_file() and (qc / "CMU-1-Small-Region.mask.png").is_file()


def test_rerun_is_a_no_op_and_new_spec_adds_rows(workspace, config, cmu_slide) -> None:
    catalog = setup([cmu_slide], workspace, config)
    first = run(catalog, workspace, config.tiling)
    ids = catalog.tiles().column("tile_id").to_pylist()
    ledger = catalog.tilings()
    again = run(catalog, workspace, config.tiling)
    assert [o.action for o in again.outcomes] == ["skipped"]
    assert catalog.tiles().column("tile_id").to_pylist() == ids and catalog.tilings() == ledger
    # a changed spec is a new spec_id: its tiles are added next to the old ones
    small = config.tiling.model_copy(update={"tile_px": 128})
    second = run(catalog, workspace, small)
    assert second.spec_id != first.spec_id
    by_spec = catalog.query("SELECT spec_id, count(*) AS n FROM tiles GROUP BY 1")
    counts = {r["spec_id"]: r["n"] for r in by_spec}
    assert counts[first.spec_id] == len(ids) and counts[second.spec_id] > 3 * len(ids)
    assert len(catalog.query("SELECT * FROM tiling_specs")) == 2


def test_spec_id_ignores_runtime_knobs_only() -> None:
    base = TilingConfig()
    assert spec_id_of(base) == spec_id_of(base.model_copy(update={"workers": 4, "device": "cpu"}))
    assert spec_id_of(base) != spec_id_of(base.model_copy(update={"min_tissue_fraction": 0.6}))


def test_min_tissue_fraction_hand_case(workspace, config, tmp_path) -> None:
    # tissue over x in [0, 704) of a 1024 x 1024 slide: columns 0-1 fully, column 2 three quarters, column 3 none
    image = slide_with_rect(np.random.default_rng(0), (1024, 1024), (0, 0, 704, 1024))
    catalog = setup([write_svs(tmp_path / "rect.svs", image)], workspace, config)
    run(catalog, workspace, config.tiling)
    tiles = catalog.tiles().to_pandas()
    assert sorted(set(tiles.x)) == [0, 256, 512] and len(tiles) == 12
    strict = config.tiling.model_copy(update={"min_tissue_fraction": 0.9})
    run(catalog, workspace, strict)
    assert catalog.query("SELECT count(*) AS n FROM tiles WHERE spec_id = ?", [spec_id_of(strict)])[0]["n"] == 8


def test_blank_slide_fails_with_reason(workspace, config, tmp_path) -> None:
    catalog = setup([write_svs(tmp_path / "blank.svs", glass(1024, 1024))], workspace, config)
    report = run(catalog, workspace, config.tiling)
    (o,) = report.outcomes
    assert o.status == "failed" and o.reason.startswith("no tissue detected")
    assert catalog.tiles().num_rows == 0
    assert catalog.tilings()[0]["status"] == "failed"
    # a rerun does not retry a failure on an unchanged slide unless asked
    assert run(catalog, workspace, config.tiling).outcomes[0].action == "skipped"
    assert run(catalog, workspace, config.tiling, retry_failed=True).outcomes[0].action == "failed"


def test_pixel_qc_rejects_flat_tissue(workspace, config, tmp_path) -> None:
    rng = np.random.default_rng(0)
    flat = write_svs(tmp_path / "flat.svs", slide_with_rect(rng, (768, 768), (0, 0, 768, 768), flat=True))
    textured = write_svs(tmp_path / "tex.svs", slide_with_rect(rng, (768, 768), (0, 0, 768, 768)))
    catalog = setup([flat, textured], workspace, config)
    cfg = config.tiling.model_copy(update={"qc": TileQCConfig(enabled=True)})
    report = run(catalog, workspace, cfg)
    assert outcome(report, "flat").reason == "all 9 tissue tiles failed pixel QC (tiling.qc)"
    assert outcome(report, "tex").n_tiles == 9
    tiles = catalog.tiles(slide_id="tex").to_pandas()
    assert (tiles.laplacian_var > 15).all() and (tiles.white_fraction < 0.6).all()


def test_40x_and_20x_give_the_same_tiles(workspace, config, tmp_path) -> None:
    from histcode.demo.compose import upsample

    image = slide_with_rect(np.random.default_rng(0), (1024, 1280), (100, 50, 1100, 900))
    lo = write_svs(tmp_path / "lo.svs", image, mpp=0.5, magnification=20)
    hi = write_svs(tmp_path / "hi.svs", upsample(image, 2), mpp=0.25, magnification=40)
    gen = write_tiff(tmp_path / "gen.tif", image, mpp=0.5)
    catalog = setup([lo, hi, gen], workspace, config)
    run(catalog, workspace, config.tiling)
    t = {s: catalog.tiles(slide_id=s).to_pandas() for s in ("lo", "hi", "gen")}
    assert (t["hi"]["size"] == 512).all() and (t["lo"]["size"] == 256).all()
    assert sorted(zip(t["lo"].x, t["lo"].y)) == sorted(zip(t["hi"].x // 2, t["hi"].y // 2))
    assert sorted(zip(t["lo"].x, t["lo"].y)) == sorted(zip(t["gen"].x, t["gen"].y))
    # the pixels read at 0.5 um/px are the same tissue (up to JPEG and resampling)
    with OpenSlideReader(lo) as a, OpenSlideReader(hi) as b:
        x, y = int(t["lo"].x.iloc[0]), int(t["lo"].y.iloc[0])
        pa_ = read_square(a, x, y, plan_read(a.level_downsamples, 256, 256))
        pb = read_square(b, 2 * x, 2 * y, plan_read(b.level_downsamples, 512, 256))
    assert pa_.shape == pb.shape == (256, 256, 3)
    assert np.abs(pa_.astype(int) - pb.astype(int)).mean() < 12


def test_slide_ids_with_dots_get_their_own_qc_pictures(workspace, config, tmp_path) -> None:
    rng = np.random.default_rng(0)
    a = write_svs(tmp_path / "a" / "S1.svs", slide_with_rect(rng, (1024, 1024), (0, 0, 1024, 1024)))
    b = write_svs(tmp_path / "b" / "S1.v2.svs", slide_with_rect(rng, (1024, 1024), (0, 0, 512, 1024)))
    catalog = setup([a, b], workspace, config)
    report = run(catalog, workspace, config.tiling)
    paths = {row["slide_id"]: row["mask_path"] for row in catalog.tilings()}
    assert paths["S1"] != paths["S1.v2"] and all(Path(p).is_file() for p in paths.values())
    assert paths["S1.v2"].endswith("S1.v2.mask.png") and not report.failed


def test_parallel_workers_give_the_same_tiles(workspace, config, tmp_path) -> None:
    rng = np.random.default_rng(0)
    paths = [write_svs(tmp_path / f"s{i}.svs", slide_with_rect(rng, (768, 1024), (0, 0, 200 + 200 * i, 768)))
             for i in range(3)]
    catalog = setup(paths, workspace, config)
    run(catalog, workspace, config.tiling.model_copy(update={"workers": 2}))
    parallel = catalog.tiles().column("tile_id").to_pylist()
    run(catalog, workspace, config.tiling, force=True)
    assert catalog.tiles().column("tile_id").to_pylist() == parallel and len(parallel) > 0


def test_put_tiling_is_atomic(workspace, config, cmu_slide) -> None:
    catalog = setup([cmu_slide], workspace, config)
    run(catalog, workspace, config.tiling)
    before = catalog.tiles().to_pylist()
    ledger = catalog.tilings()
    record_row = dict(ledger[0])
    from histcode.store.records import TilingRecord

    rec = TilingRecord(**{k: record_row[k] for k in TilingRecord.__dataclass_fields__ if k in record_row})
    broken = catalog.tiles().set_column(0, "tile_id", pa.array([None] * len(before), pa.string()))
    with pytest.raises(Exception, match="NOT NULL"):
        catalog.put_tiling(rec, broken)  # the insert fails after the delete: all of it rolls back
    assert catalog.tiles().to_pylist() == before and catalog.tilings() == ledger
    rec.content_hash = "stale"
    with pytest.raises(CatalogError, match="changed or was removed while it was being tiled"):
        catalog.put_tiling(rec, None)
