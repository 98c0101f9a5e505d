"""Ingestion on real slides and on every kind of bad input; reruns are no-ops; changes invalidate."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from histcode.ingest.run import ingest_sources
from histcode.ingest.sources import ManifestError, patient_of, read_manifest, sources_from_paths
from histcode.store.catalog import Catalog
from tests.conftest import FIXTURES, SLIDES
from tests.helpers import slide_with_rect, write_svs, write_tiff, write_tiff_96dpi

LC_TILE = Path(__file__).resolve().parents[1] / "data" / "lc25000_lung" / "lung_n" / "lungn1004.jpeg"


def ingest(paths, workspace, config, mpp=None):
    catalog = Catalog(workspace.catalog_path)
    report = ingest_sources(sources_from_paths(list(paths), config.ingest.extensions, mpp), catalog, config.ingest,
                            progress=False)
    return report, catalog


def by_id(report):
    return {o.slide_id: o for o in report.outcomes}


def test_real_slides_register_with_their_metadata(workspace, config, cmu_slide) -> None:
    report, catalog = ingest([cmu_slide, SLIDES / "small.svs"], workspace, config)
    assert [o.action for o in report.outcomes] == ["registered", "registered"]
    row = catalog.get_slide("CMU-1-Small-Region")
    assert row["status"] == "ok" and row["vendor"] == "aperio"
    assert (row["width"], row["height"], row["level_count"]) == (2220, 2967, 1)
    assert row["level_dimensions"] == [[2220, 2967]] and row["level_downsamples"] == [1.0]
    assert row["mpp_x"] == pytest.approx(0.499) and row["mpp_source"] == "slide" and row["objective"] == 20
    assert row["hash_kind"] == "quickhash-1" and len(row["content_hash"]) == 64
    assert row["storage_tile"] == [240, 240]


def test_bad_inputs_fail_with_their_reason_and_the_rest_continue(workspace, config, cmu_slide, tmp_path) -> None:
    rng = np.random.default_rng(0)
    bad = tmp_path / "bad"
    bad.mkdir()
    data = cmu_slide.read_bytes()
    (bad / "truncated.svs").write_bytes(data[: len(data) // 2])
    (bad / "empty.svs").write_bytes(b"")
    (bad / "notes.svs").write_text("this is not a slide\n" * 50)
    shutil.copy(LC_TILE, bad / "photo.jpeg")
    write_tiff_96dpi(bad / "dpi96.tif", slide_with_rect(rng, (512, 512), (100, 100, 400, 400)))
    paths = [cmu_slide, *(bad / n for n in ("truncated.svs", "empty.svs", "notes.svs", "photo.jpeg", "dpi96.tif")),
             bad / "missing.svs", SLIDES / "boxes.tiff"]
    report, catalog = ingest(paths, workspace, config)
    out = by_id(report)
    assert out["CMU-1-Small-Region"].status == "ok"
    reasons = {k: v.reason for k, v in out.items() if v.status == "failed"}
    assert reasons["truncated"].startswith("truncated: directory 1 should start at byte")
    assert reasons["empty"] == "empty file (0 bytes)"
    assert reasons["notes"] == "not a whole-slide image format OpenSlide recognises"
    # a JPEG is read as an image without a pyramid; this one carries no scale
    assert reasons["photo"].startswith("no mpp in the slide metadata") and "--mpp" in reasons["photo"]
    assert reasons["missing"] == "file not found"
    assert "264.6x264.6 um/px is implausible" in reasons["dpi96"] and "--mpp" in reasons["dpi96"]
    assert "352.8x352.8 um/px is implausible" in reasons["boxes"]
    assert len(report.failed) == 7
    # failures are recorded in the catalog with their reasons, nothing else about them is trusted
    rows = {r["slide_id"]: r for r in catalog.slides(status="failed")}
    assert set(rows) == set(reasons) and rows["empty"]["reason"] == reasons["empty"]
    assert rows["dpi96"]["mpp_x"] is None


def test_stripped_tiff_is_read_without_openslide(workspace, config, tmp_path) -> None:
    import tifffile

    path = tmp_path / "stripped.tif"
    tifffile.imwrite(path, np.zeros((300, 300, 3), np.uint8), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    report, catalog = ingest([path], workspace, config)
    assert report.outcomes[0].status == "ok"
    row = catalog.get_slide("stripped")
    assert (row["vendor"], row["mpp_x"], row["mpp_source"]) == ("image (no pyramid)", pytest.approx(0.5), "slide")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(workspace, config, copy_slide, cmu_slide) -> None:
    path = copy_slide(cmu_slide)
    path.chmod(0)
    report, _ = ingest([path], workspace, config)
    assert report.outcomes[0].reason == "cannot read the file: permission denied"


def test_user_mpp_rescues_a_slide_without_scale(workspace, config, tmp_path) -> None:
    path = write_tiff_96dpi(tmp_path / "dpi96.tif", slide_with_rect(np.random.default_rng(0), (512, 512), (0, 0, 512, 512)))
    report, catalog = ingest([path], workspace, config)
    assert report.outcomes[0].status == "failed"
    report, catalog = ingest([path], workspace, config, mpp=0.5)
    row = catalog.get_slide("dpi96")
    assert (report.outcomes[0].status, row["mpp_x"], row["mpp_source"]) == ("ok", 0.5, "user")


def test_generic_tiff_and_40x_scale(workspace, config, tmp_path) -> None:
    image = slide_with_rect(np.random.default_rng(0), (512, 768), (0, 0, 768, 512))
    a = write_tiff(tmp_path / "gen.tif", image, mpp=0.5)
    b = write_svs(tmp_path / "hi.svs", image, mpp=0.25, magnification=40)
    _, catalog = ingest([a, b], workspace, config)
    gen, hi = catalog.get_slide("gen"), catalog.get_slide("hi")
    assert gen["vendor"] == "generic-tiff" and gen["mpp_x"] == pytest.approx(0.5) and gen["mpp_source"] == "slide"
    assert hi["vendor"] == "aperio" and hi["mpp_x"] == pytest.approx(0.25) and hi["objective"] == 40


def test_rerun_is_a_no_op(workspace, config, cmu_slide) -> None:
    _, catalog = ingest([cmu_slide], workspace, config)
    before = catalog.get_slide("CMU-1-Small-Region")
    report, _ = ingest([cmu_slide], workspace, config)
    assert report.outcomes[0].action == "unchanged"
    assert catalog.get_slide("CMU-1-Small-Region") == before  # not even updated_at moved


def test_touched_file_is_reinspected_but_unchanged(workspace, config, copy_slide, cmu_slide) -> None:
    path = copy_slide(cmu_slide)
    _, catalog = ingest([path], workspace, config)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    report, _ = ingest([path], workspace, config)
    assert report.outcomes[0].action == "unchanged"
    assert catalog.get_slide("CMU-1-Small-Region")["file_mtime"] == 1_000_000_000


def test_changed_file_is_reregistered_and_invalidates_tiles(workspace, config, tmp_path) -> None:
    from histcode.tiling.run import tile_slides

    rng = np.random.default_rng(0)
    path = write_svs(tmp_path / "s.svs", slide_with_rect(rng, (1024, 1024), (0, 0, 1024, 1024)))
    _, catalog = ingest([path], workspace, config)
    tile_slides(catalog, config.tiling, workspace.outputs_dir / "qc", progress=False)
    assert catalog.tiles(slide_id="s").num_rows == 16
    old_hash = catalog.get_slide("s")["content_hash"]
    write_svs(path, slide_with_rect(rng, (1024, 1024), (0, 0, 512, 1024)))  # same name, new pixels
    report, _ = ingest([path], workspace, config)
    assert report.outcomes[0].action == "changed"
    assert catalog.get_slide("s")["content_hash"] != old_hash
    assert catalog.tiles(slide_id="s").num_rows == 0
    (ledger,) = catalog.tilings()
    assert ledger["status"] == "invalidated" and "slide changed" in ledger["reason"]
    # the next tiling run picks it up again, with new tile ids
    tile_slides(catalog, config.tiling, workspace.outputs_dir / "qc", progress=False)
    assert catalog.tiles(slide_id="s").num_rows == 8


def test_a_briefly_missing_file_keeps_its_tiles(workspace, config, tmp_path) -> None:
    from histcode.tiling.run import tile_slides

    path = write_svs(tmp_path / "s.svs", slide_with_rect(np.random.default_rng(0), (768, 768), (0, 0, 768, 768)))
    _, catalog = ingest([path], workspace, config)
    tile_slides(catalog, config.tiling, workspace.outputs_dir / "qc", progress=False)
    away = tmp_path / "elsewhere.svs"
    path.rename(away)  # an unmounted share, a file being copied
    report, _ = ingest([path], workspace, config)
    assert report.outcomes[0].reason == "file not found"
    row = catalog.get_slide("s")
    assert row["status"] == "failed" and row["content_hash"] and catalog.tiles(slide_id="s").num_rows == 9
    away.rename(path)
    report, _ = ingest([path], workspace, config)
    assert report.outcomes[0].action == "unchanged" and catalog.get_slide("s")["status"] == "ok"
    assert catalog.tiles(slide_id="s").num_rows == 9 and catalog.tilings()[0]["status"] == "ok"


def test_mpp_option_does_not_override_a_slide_scale(workspace, config, tmp_path) -> None:
    image = slide_with_rect(np.random.default_rng(0), (512, 512), (0, 0, 512, 512))
    hi = write_svs(tmp_path / "hi.svs", image, mpp=0.25, magnification=40)
    bare = write_tiff_96dpi(tmp_path / "bare.tif", image)
    report, catalog = ingest([hi, bare], workspace, config, mpp=0.5)
    assert catalog.get_slide("hi")["mpp_x"] == pytest.approx(0.25) and catalog.get_slide("hi")["mpp_source"] == "slide"
    assert catalog.get_slide("bare")["mpp_source"] == "user"
    assert [o.action for o in ingest([hi, bare], workspace, config, mpp=0.5)[0].outcomes] == ["unchanged", "unchanged"]


def test_duplicate_slide_ids_are_refused(workspace, config, copy_slide, cmu_slide, tmp_path) -> None:
    other = tmp_path / "other" / cmu_slide.name
    other.parent.mkdir()
    shutil.copy(cmu_slide, other)
    report, _ = ingest([cmu_slide, other], workspace, config)
    assert [o.status for o in report.outcomes] == ["ok", "failed"]  # in the order given: the first one is kept
    assert report.outcomes[1].reason.startswith("duplicate slide_id 'CMU-1-Small-Region'")


def test_directory_scan_takes_slide_extensions_only(workspace, config) -> None:
    sources = sources_from_paths([SLIDES], config.ingest.extensions)
    assert sorted(s.slide_id for s in sources) == ["CMU-1-Small-Region", "boxes", "small"]


def test_manifest(tmp_path, cmu_slide) -> None:
    manifest = tmp_path / "m.csv"
    rel = os.path.relpath(cmu_slide, tmp_path)
    manifest.write_text(f"path,slide_id,patient_id,mpp,extra\n{rel},S1,P1,,x\n{cmu_slide},TCGA-AB-1234-01Z-00-DX1,,0.25,y\n")
    a, b = read_manifest(manifest)
    assert a.path.resolve() == cmu_slide.resolve()
    assert (a.slide_id, a.patient_id, a.mpp, a.attributes) == ("S1", "P1", None, (("extra", "x"),))
    assert (b.patient_id, b.mpp, b.attributes) == ("TCGA-AB-1234", 0.25, (("extra", "y"),))


def test_manifest_attributes_reach_the_catalog_and_sql(workspace, config, cmu_slide, tmp_path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,slide_id,subtype,site\n{cmu_slide},S1,LUSC,skin\n")
    catalog = Catalog(workspace.catalog_path)
    ingest_sources(read_manifest(manifest), catalog, config.ingest, progress=False)
    rows = catalog.query("SELECT slide_id, attributes->>'subtype' AS subtype, attributes->>'site' AS site FROM slides")
    assert rows == [{"slide_id": "S1", "subtype": "LUSC", "site": "skin"}]
    # a changed attribute updates the row without touching the pixels' derived rows
    manifest.write_text(f"path,slide_id,subtype,site\n{cmu_slide},S1,LUAD,skin\n")
    (outcome,) = ingest_sources(read_manifest(manifest), catalog, config.ingest, progress=False).outcomes
    assert outcome.action == "updated" and catalog.query("SELECT attributes->>'subtype' AS s FROM slides")[0]["s"] == "LUAD"


def test_manifest_with_excel_byte_order_mark(tmp_path, cmu_slide) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"\xef\xbb\xbfpath,slide_id\n" + str(cmu_slide).encode() + b",S1\n")
    assert read_manifest(manifest)[0].slide_id == "S1"


@pytest.mark.parametrize(
    ("text", "match"),
    [("slide,x\na,b\n", "needs a 'path' column"), ("path,mpp\n,0.5\n", "line 2: empty path"),
     ("path,mpp\na.svs,fast\n", "line 2: mpp 'fast' is not a number")],
)
def test_manifest_errors_name_the_line(tmp_path, text, match) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(ManifestError, match=match):
        read_manifest(manifest)


def test_patient_of_tcga_barcodes() -> None:
    assert patient_of("TCGA-05-4244-01Z-00-DX1") == "TCGA-05-4244"
    assert patient_of("slide-7") == "slide-7"


def test_fixtures_are_untouched() -> None:
    # the copies in tests/fixtures are the real files from the shared data (sizes as documented)
    assert (SLIDES / "CMU-1-Small-Region.svs").stat().st_size == 1938955
    assert FIXTURES.is_dir()


def test_a_catalog_from_the_first_schema_is_migrated(tmp_path) -> None:
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("CREATE TABLE slides (slide_id VARCHAR PRIMARY KEY, path VARCHAR, status VARCHAR)")
    con.execute("INSERT INTO slides VALUES ('S1', '/x.svs', 'ok')")
    con.close()
    catalog = Catalog(path)
    with catalog.connect():
        pass
    cols = {r["column_name"] for r in catalog.query("SELECT column_name FROM information_schema.columns WHERE table_name = 'slides'")}
    from histcode.store.schema import SCHEMA_VERSION

    assert "attributes" in cols and catalog.query("SELECT value FROM meta")[0]["value"] == str(SCHEMA_VERSION)
    assert catalog.query("SELECT slide_id FROM slides") == [{"slide_id": "S1"}]
    assert {"feature_views", "materializations"} <= {r["table_name"] for r in catalog.query("SELECT table_name FROM information_schema.tables")}


def test_a_catalog_from_before_cohorts_is_upgraded_by_a_read(workspace, config, cmu_slide) -> None:
    """Schema 4 had no cohorts: a read-only command (slides, pretrain, heads) upgrades it first; its slides
    become the training cohort 'default'."""
    import duckdb

    catalog = Catalog.of(workspace)
    ingest_sources(sources_from_paths([cmu_slide], config.ingest.extensions), catalog, config.ingest, progress=False)
    con = duckdb.connect(str(catalog.path))
    con.execute("DROP TABLE cohorts")
    con.execute("ALTER TABLE slides DROP COLUMN cohort")
    con.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    con.close()
    assert catalog.cohorts() == {"default": "training"}
    assert [s["cohort"] for s in catalog.slides()] == ["default"]
    assert catalog.training_cohorts() == ["default"]
