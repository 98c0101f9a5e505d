"""Other tools' files in and out (histcode.exchange), on the tiny demo cohort's real slides and stores.

The TRIDENT and CLAM files here are written with h5py as those tools write them (TRIDENT ``trident/IO.py``
``save_h5`` / ``coords_to_h5`` and ``WSI.extract_patch_features``; CLAM ``extract_features_fp.py`` with
``utils/file_utils.py:save_hdf5`` and ``create_patches_fp.py``'s patch files), not with the exporter under test;
the AnnData file is read back by a reader written here from AnnData's on-disk format specification."""

from __future__ import annotations

import json
import uuid

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from histcode.cli import app
from histcode.exchange.export_h5 import export_h5
from histcode.exchange.geojson import export_geojson
from histcode.exchange.h5ad import export_anndata
from histcode.exchange.h5files import ExchangeError
from histcode.exchange.importing import import_features
from histcode.exchange.patches import ClamGrid
from histcode.features.read import tile_features
from histcode.features.registry import load_view, training_state
from histcode.features.search import search
from histcode.heads.apply import LoadedHead
from histcode.heads.data import load_bags
from histcode.heads.models import CLAMSingleBranch
from histcode.store.catalog import Catalog

DIM = 8


# -- files as the other tools write them ---------------------------------------------------------------------
def write_trident(path, features, coords, *, patch_size, src_mag, target_mag, width, height, encoder="uni_v1"):
    """One slide's TRIDENT patch features: chunked (1, ...) resizable datasets, None written as 'None'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    with h5py.File(path, "w") as f:
        feats = f.create_dataset("features", data=np.asarray(features, np.float32), chunks=(1, features.shape[1]),
                                 maxshape=(None, features.shape[1]))
        feats.attrs.update({"name": stem, "savetodir": str(path.parent), "encoder": encoder})
        xy = f.create_dataset("coords", data=np.asarray(coords, np.int64), chunks=(1, 2), maxshape=(None, 2))
        xy.attrs.update({"patch_size": patch_size, "patch_size_level0": patch_size * src_mag // target_mag,
                         "level0_magnification": src_mag, "target_magnification": target_mag, "overlap": 0,
                         "name": stem, "savetodir": str(path.parent.parent), "level0_width": width,
                         "level0_height": height})


def write_clam(path, features, coords):
    """CLAM's h5_files/<slide>.h5: features float32 and coords int32, chunks of 32, no attributes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name, data in (("features", np.asarray(features, np.float32)), ("coords", np.asarray(coords, np.int32))):
            f.create_dataset(name, data=data, chunks=(32, *data.shape[1:]), maxshape=(None, *data.shape[1:]))


def write_clam_patches(path, coords, patch_size, patch_level, downsample, level_dim, name):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        dset.attrs.update({"patch_size": patch_size, "patch_level": patch_level, "downsample": downsample,
                           "downsampled_level_dim": level_dim, "level_dim": level_dim, "name": name,
                           "save_path": str(path.parent)})


def grid(slide: dict, size: int, n: int) -> np.ndarray:
    xs = np.arange(0, int(slide["width"]) - size + 1, size)
    ys = np.arange(0, int(slide["height"]) - size + 1, size)
    return np.array([(x, y) for y in ys for x in xs][:n], dtype=np.int64)


def mag(slide: dict) -> int:
    return int(round(10 / slide["mpp_x"]))


@pytest.fixture
def cohort(tiled_workspace):
    ws = tiled_workspace
    slides = Catalog.of(ws).slides("ok")
    return ws, slides


def trident_folder(tmp_path, slides, rng, n=6, patch_size=64):
    """features_uni_v1/ with one file per slide; returns (folder, {slide_id: (vectors, coords, size)})."""
    folder = tmp_path / "job" / "20x_64px_0px_overlap" / "features_uni_v1"
    truth = {}
    for s in slides:
        size = patch_size * mag(s) // 20
        coords = grid(s, size, n)
        vectors = rng.normal(size=(len(coords), DIM)).astype(np.float32)
        write_trident(folder / f"{s['slide_id']}.h5", vectors, coords, patch_size=patch_size, src_mag=mag(s),
                      target_mag=20, width=s["width"], height=s["height"])
        truth[s["slide_id"]] = (vectors, coords, size)
    return folder, truth


def by_corner(table) -> dict:
    rows = table.to_pylist()
    return {(r["slide_id"], r["x"], r["y"]): np.asarray(r["vector"], np.float32) for r in rows}


# -- import ---------------------------------------------------------------------------------------------------
def test_trident_import_writes_a_view_the_store_reads_like_an_embedded_one(cohort, tmp_path) -> None:
    ws, slides = cohort
    cfg = ws.config()
    rng = np.random.default_rng(0)
    good, bad_shape, bad_coords = slides[0], slides[1], slides[2]
    folder, truth = trident_folder(tmp_path, [good, slides[3]], rng)
    size = truth[good["slide_id"]][2]
    coords = grid(bad_shape, 64 * mag(bad_shape) // 20, 5)
    write_trident(folder / f"{bad_shape['slide_id']}.h5", rng.normal(size=(5, DIM)), coords[:4], patch_size=64,
                  src_mag=mag(bad_shape), target_mag=20, width=bad_shape["width"], height=bad_shape["height"])
    outside = grid(bad_coords, 64, 3) + np.array([[0, 0], [0, 0], [int(bad_coords["width"]), 0]])
    write_trident(folder / f"{bad_coords['slide_id']}.h5", rng.normal(size=(3, DIM)), outside, patch_size=64,
                  src_mag=mag(bad_coords), target_mag=20, width=bad_coords["width"], height=bad_coords["height"])
    write_trident(folder / "no-such-slide.h5", rng.normal(size=(2, DIM)), [[0, 0], [64, 0]], patch_size=64,
                  src_mag=20, target_mag=20, width=1000, height=1000)
    truncated = slides[4]
    (folder / f"{truncated['slide_id']}.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 20)

    report = import_features(ws, cfg, "trident", tmp_path / "job")
    outcome = {o.file: o for o in report.outcomes}
    assert {f for f, o in outcome.items() if o.action == "imported"} == {f"{good['slide_id']}.h5", f"{slides[3]['slide_id']}.h5"}
    assert "5 feature rows but 4 coordinates" in outcome[f"{bad_shape['slide_id']}.h5"].reason
    assert "fall outside slide" in outcome[f"{bad_coords['slide_id']}.h5"].reason
    assert "no slide 'no-such-slide'" in outcome["no-such-slide.h5"].reason
    assert "not a readable HDF5" in outcome[f"{truncated['slide_id']}.h5"].reason

    catalog = Catalog.of(ws)
    view = load_view(catalog, report.view.view_id, cfg.features.attribute_columns)
    assert (view.model_name, view.dim, view.method) == ("trident:uni_v1", DIM, "imported:trident")
    spec = json.loads(catalog.query("SELECT spec_json FROM tiling_specs WHERE spec_id = ?", [view.spec_id])[0]["spec_json"])
    assert (spec["importer"], spec["tile_px"], spec["target_magnification"]) == ("trident", 64, 20)
    # vectors and corners exactly as the files hold them; the slide table is the mean of the tiles
    stored = by_corner(tile_features(ws, view))
    expected = {(sid, int(x), int(y)): v[i] for sid, (v, c, _) in truth.items() for i, (x, y) in enumerate(c)}
    assert stored.keys() == expected.keys()
    for key, vector in expected.items():
        np.testing.assert_array_equal(stored[key], vector)
    tiles = catalog.tiles(good["slide_id"], view.spec_id)
    assert tiles.num_rows == len(truth[good["slide_id"]][1]) and set(tiles.column("size").to_pylist()) == {size}
    from histcode.features.read import slide_features

    slide_rows = {r["slide_id"]: r for r in slide_features(ws, view).to_pylist()}
    np.testing.assert_allclose(slide_rows[good["slide_id"]]["vector"], truth[good["slide_id"]][0].mean(axis=0), rtol=1e-6)
    assert slide_rows[good["slide_id"]]["n_tiles"] == len(truth[good["slide_id"]][1])
    # the failed files' slides left nothing in this view: no vectors, no tiles, no ledger rows
    for s in (bad_shape, bad_coords, truncated):
        assert catalog.tiles(s["slide_id"], view.spec_id).num_rows == 0
        assert catalog.tiling(s["slide_id"], view.spec_id) is None
    assert {r["slide_id"] for r in catalog.query("SELECT slide_id FROM materializations WHERE view_id = ?",
                                                 [view.view_id])} == set(truth)
    assert catalog.query("SELECT status FROM feature_views WHERE view_id = ?", [view.view_id])[0]["status"] == "partial"
    # what the heads read (training state, bags) and tile search (against brute-force cosine)
    assert {sid for sid, _, _ in training_state(catalog, view, catalog.training_cohorts(()))} == set(truth)
    bag = load_bags(ws, view, slide_ids=[good["slide_id"]])[good["slide_id"]]
    assert bag.size == size and bag.features.shape == (len(truth[good["slide_id"]][1]), DIM)
    query_id = tiles.column("tile_id")[0].as_py()
    hits = search(ws, view, cfg.features, tile_id=query_id, k=3).to_pylist()
    everything = tile_features(ws, view).to_pylist()
    q = next(np.asarray(r["vector"]) for r in everything if r["tile_id"] == query_id)
    cosine = {r["tile_id"]: 1 - np.dot(q, r["vector"]) / np.linalg.norm(q) / np.linalg.norm(r["vector"])
              for r in everything if r["tile_id"] != query_id}
    assert [h["tile_id"] for h in hits] == sorted(cosine, key=cosine.get)[:3]

    # a rerun writes nothing; a re-extracted file (same name, new vectors) replaces that slide's rows
    versions = report.versions
    again = import_features(ws, cfg, "trident", tmp_path / "job")
    assert again.view.view_id == view.view_id and again.count("skipped") == 2 and again.count("imported") == 0
    assert by_corner(tile_features(ws, view)).keys() == expected.keys()
    from histcode.features.read import view_table
    from histcode.store.vectors import TILE_KIND

    assert view_table(ws, view, TILE_KIND).version == versions["tile"]
    v, c, _ = truth[good["slide_id"]]
    write_trident(folder / f"{good['slide_id']}.h5", v[:3] + 1, c[:3], patch_size=64, src_mag=mag(good), target_mag=20,
                  width=good["width"], height=good["height"])
    third = import_features(ws, cfg, "trident", folder)
    assert third.count("imported") == 1
    rows = {k: r for k, r in by_corner(tile_features(ws, view)).items() if k[0] == good["slide_id"]}
    assert len(rows) == 3 and catalog.tiles(good["slide_id"], view.spec_id).num_rows == 3
    np.testing.assert_array_equal(rows[(good["slide_id"], int(c[0, 0]), int(c[0, 1]))], v[0] + 1)


def test_clam_import_takes_the_grid_from_its_patch_files(cohort, tmp_path) -> None:
    ws, slides = cohort
    cfg = ws.config()
    rng = np.random.default_rng(1)
    multi = [s for s in slides if s["level_count"] > 1][:1] or slides[:1]
    chosen = multi + [s for s in slides if s["slide_id"] != multi[0]["slide_id"]][:1]
    feats, truth = tmp_path / "clam_feats", {}
    for s in chosen:
        level = 1 if s["level_count"] > 1 else 0
        downsample = s["level_downsamples"][level]
        size = int(round(96 * downsample))
        coords = grid(s, size, 5)
        vectors = rng.normal(size=(len(coords), DIM))
        write_clam(feats / "h5_files" / f"{s['slide_id']}.h5", vectors, coords)
        write_clam_patches(tmp_path / "clam" / "patches" / f"{s['slide_id']}.h5", coords, 96, level, downsample,
                           s["level_dimensions"][level], s["slide_id"])
        truth[s["slide_id"]] = (vectors.astype(np.float32), coords, size, level)

    assert any(level > 0 for _, _, _, level in truth.values()), "no pyramid slide: the downsample goes untested"
    empty = [s for s in slides if s["slide_id"] not in truth][0]
    with h5py.File(feats / "h5_files" / f"{empty['slide_id']}.h5", "w") as f:  # what TRIDENT writes for no tissue
        f.create_dataset("features", data=np.empty((0,), np.float32))
        f.create_dataset("coords", data=np.empty((0, 2), np.int64))

    without = import_features(ws, cfg, "clam", feats, encoder="uni_v1")
    reasons = {o.slide_id: o.reason for o in without.outcomes}
    assert without.count("imported") == 0 and reasons.pop(empty["slide_id"]).startswith("no patches")
    assert all("pass --patches DIR" in r for r in reasons.values())
    assert without.view is None  # nothing registered when no file could be imported

    report = import_features(ws, cfg, "clam", feats, encoder="uni_v1",
                             clam=ClamGrid(patches_dir=tmp_path / "clam" / "patches"))
    assert report.count("imported") == len(chosen) and [o.slide_id for o in report.failed] == [empty["slide_id"]]
    view = report.view
    assert view.model_name == "clam:uni_v1"
    catalog = Catalog.of(ws)
    for sid, (vectors, coords, size, level) in truth.items():
        tiles = catalog.tiles(sid, view.spec_id)
        assert set(tiles.column("size").to_pylist()) == {size} and set(tiles.column("level").to_pylist()) == {level}
        stored = by_corner(tile_features(ws, view, slide_ids=[sid]))
        for i, (x, y) in enumerate(coords):
            np.testing.assert_array_equal(stored[(sid, int(x), int(y))], vectors[i])


def test_import_refuses_a_folder_without_feature_files(cohort, tmp_path) -> None:
    ws, _ = cohort
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExchangeError, match="no trident feature files"):
        import_features(ws, ws.config(), "trident", tmp_path / "empty")


# -- export and round trips -----------------------------------------------------------------------------------
def test_h5_export_is_trident_layout_and_imports_back_to_the_same_vectors(embedded_workspace, copy_workspace, tmp_path) -> None:
    ws = copy_workspace(embedded_workspace)
    cfg = ws.config()
    catalog = Catalog.of(ws)
    view = load_view(catalog, None, cfg.features.attribute_columns)
    original = by_corner(tile_features(ws, view))
    result = export_h5(ws, view, tmp_path / "export")
    target = round(10 / cfg.tiling.target_mpp)
    assert result.folder.parent.name == f"{target}x_{cfg.tiling.tile_px}px_0px_overlap"
    assert result.folder.name == f"features_{view.model_name}-v{view.model_version}"
    slide_ids = sorted({k[0] for k in original})
    assert sorted(p.stem for p in result.files) == slide_ids
    with h5py.File(result.files[0], "r") as f:  # what TRIDENT's and CLAM's loaders read
        assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int64
        assert f["features"].shape[0] == f["coords"].shape[0] and f["coords"].shape[1] == 2
        assert f["features"].attrs["encoder"] == result.folder.name.removeprefix("features_")
        attrs = dict(f["coords"].attrs)
        slide = catalog.get_slide(result.files[0].stem)
        assert attrs["level0_width"] == slide["width"] and attrs["patch_size"] == cfg.tiling.tile_px
        size = catalog.tiles(slide["slide_id"], view.spec_id).column("size")[0].as_py()
        assert attrs["patch_size_level0"] == size

    report = import_features(ws, cfg, "trident", tmp_path / "export")
    assert report.count("imported") == len(slide_ids) and not report.failed
    back = by_corner(tile_features(ws, report.view))
    assert back.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(back[key], original[key])

    # exporting the imported view and importing that gives the same view, with nothing to do
    export_h5(ws, report.view, tmp_path / "export2")
    again = import_features(ws, cfg, "trident", tmp_path / "export2")
    assert again.view.view_id == report.view.view_id and again.count("skipped") == len(slide_ids)


def read_elem(node):
    """An AnnData element read from the on-disk specification (anndata 0.8+), checking the encoding metadata
    every element MUST carry."""
    kind, version = node.attrs["encoding-type"], node.attrs["encoding-version"]
    expected = {"anndata": "0.1.0", "dataframe": "0.2.0", "array": "0.2.0", "string-array": "0.2.0",
                "categorical": "0.2.0", "dict": "0.1.0", "string": "0.2.0", "numeric-scalar": "0.2.0"}
    assert expected[kind] == version, (node.name, kind, version)
    if kind == "array":
        return node[()]
    if kind == "string-array":
        assert h5py.check_string_dtype(node.dtype).encoding == "utf-8"
        return [v.decode() for v in node[()]]
    if kind == "string":
        return node[()].decode()
    if kind == "numeric-scalar":
        assert node.shape == ()
        return node[()].item()
    if kind == "categorical":
        assert isinstance(node.attrs["ordered"], (bool, np.bool_))
        codes, categories = read_elem(node["codes"]), read_elem(node["categories"])
        assert codes.max() < len(categories)
        return [None if c < 0 else categories[c] for c in codes]
    if kind == "dataframe":
        index_key = node.attrs["_index"]
        order = list(node.attrs["column-order"])
        assert set(node) == {index_key, *order}
        columns = {name: read_elem(node[name]) for name in order}
        index = read_elem(node[index_key])
        assert all(len(c) == len(index) for c in columns.values())
        return index, columns
    if kind in ("dict", "anndata"):
        return {name: read_elem(node[name]) for name in node}
    raise AssertionError(f"unknown encoding {kind}")


def test_anndata_export_follows_the_on_disk_specification(embedded_workspace, copy_workspace, tmp_path) -> None:
    ws = copy_workspace(embedded_workspace)
    view = load_view(Catalog.of(ws), None, ws.config().features.attribute_columns)
    path = export_anndata(ws, view, tmp_path / "view.h5ad")
    with h5py.File(path, "r") as f:
        adata = read_elem(f)
    obs_names, obs = adata["obs"]
    var_names, _ = adata["var"]
    x = adata["X"]
    stored = tile_features(ws, view).to_pylist()
    assert x.shape == (len(stored), view.dim) == (len(obs_names), len(var_names)) and x.dtype == np.float32
    by_id = {r["tile_id"]: r for r in stored}
    assert obs_names == obs["tile_id"] and set(obs_names) == set(by_id)
    slides = {s["slide_id"]: s for s in Catalog.of(ws).slides()}
    for i, tid in enumerate(obs_names):
        r = by_id[tid]
        np.testing.assert_array_equal(x[i], np.asarray(r["vector"], np.float32))
        assert (obs["slide_id"][i], obs["x"][i], obs["y"][i], obs["size"][i]) == (r["slide_id"], r["x"], r["y"], r["size"])
        assert obs["patient_id"][i] == slides[r["slide_id"]]["patient_id"]
        np.testing.assert_array_equal(adata["obsm"]["spatial"][i], [r["x"] + r["size"] / 2, r["y"] + r["size"] / 2])
    attrs = json.loads(slides[obs["slide_id"][0]]["attributes"] or "{}")
    for key, value in attrs.items():
        if value not in (None, "") and key in obs:
            assert obs[key][0] == str(value)
    info = adata["uns"]["histcode"]
    assert (info["encoder"], info["view_id"], info["dim"]) == (view.model_name, view.view_id, view.dim)


def test_geojson_export_is_a_qupath_feature_collection_with_stored_scores(embedded_workspace, copy_workspace, tmp_path) -> None:
    ws = copy_workspace(embedded_workspace)
    cfg = ws.config()
    catalog = Catalog.of(ws)
    view = load_view(catalog, None, cfg.features.attribute_columns)
    slide_id = sorted({r["slide_id"] for r in tile_features(ws, view).to_pylist()})[0]
    tiles = catalog.tiles(slide_id, view.spec_id).to_pylist()
    scored = {t["tile_id"]: 0.1 * i for i, t in enumerate(tiles[:4])}
    with catalog.transaction() as con:  # rows as a heatmap run stores them
        for t in tiles[:4]:
            con.execute("INSERT INTO tile_scores VALUES ('tumor-head', '3', ?, ?, ?, ?, ?, 'attention', ?, now())",
                        [slide_id, t["tile_id"], t["x"], t["y"], t["size"], scored[t["tile_id"]]])
    result = export_geojson(ws, cfg, slide_id, view, tmp_path / "tiles.geojson")
    doc = json.loads(result.path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(tiles) == result.tiles
    corners = {t["tile_id"]: t for t in tiles}
    ids = set()
    for feature in doc["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        ids.add(str(uuid.UUID(feature["id"])))
        props = feature["properties"]
        assert props["objectType"] == "tile"
        t = corners[props["metadata"]["tile_id"]]
        ring = feature["geometry"]["coordinates"][0]
        x, y, s = t["x"], t["y"], t["size"]
        assert ring[0] == ring[-1] and sorted(map(tuple, ring[:4])) == sorted([(x, y), (x + s, y), (x, y + s), (x + s, y + s)])
        measurements = props.get("measurements", {})
        assert all(isinstance(v, float) for v in measurements.values())
        if t["tile_id"] in scored:
            assert measurements["tumor-head v3 attention"] == pytest.approx(scored[t["tile_id"]])
        else:
            assert "tumor-head v3 attention" not in measurements
    assert len(ids) == len(tiles)
    detection = export_geojson(ws, cfg, slide_id, view, tmp_path / "d.geojson", object_type="detection")
    again = json.loads(detection.path.read_text())["features"]
    assert {f["properties"]["objectType"] for f in again} == {"detection"}
    assert {f["id"] for f in again} == ids  # the same objects each time
    # a head that reads this view and has no stored scores is run on the slide's bag: attention, class
    # probabilities and the tile's call; a head whose scores are stored is not run again
    torch.manual_seed(0)
    model = CLAMSingleBranch(view.dim, n_classes=2).eval()
    live = LoadedHead("tumor", "7", "attention", view.view_id, view.encoder_uri, ("normal", "tumor"), (), lambda: model)
    stale = LoadedHead("tumor", "3", "attention", view.view_id, view.encoder_uri, ("normal", "tumor"), (), lambda: model)
    scored_now = export_geojson(ws, cfg, slide_id, view, tmp_path / "live.geojson", heads=[live, stale])
    assert scored_now.heads == ["tumor-head v7"] and scored_now.classified == len(tiles)
    features = json.loads(scored_now.path.read_text())["features"]
    raw = [f["properties"]["measurements"]["tumor-head v7 attention_raw"] for f in features]
    assert sum(raw) == pytest.approx(1.0, abs=1e-5)  # softmax over the slide's tiles
    for f in features:
        m = f["properties"]["measurements"]
        assert m["tumor-head v7 p(normal)"] + m["tumor-head v7 p(tumor)"] == pytest.approx(1.0, abs=1e-5)
        call = "tumor" if m["tumor-head v7 p(tumor)"] > m["tumor-head v7 p(normal)"] else "normal"
        assert f["properties"]["classification"]["name"] == call
        assert not any(k.startswith("tumor-head v3 p(") for k in m)
    other = LoadedHead("tumor", "8", "attention", "fv-other", view.encoder_uri, ("normal", "tumor"), (), lambda: model)
    with pytest.raises(ExchangeError, match="read another view"):
        export_geojson(ws, cfg, slide_id, view, heads=[other])
    with pytest.raises(ExchangeError, match="no slide"):
        export_geojson(ws, cfg, "no-such-slide", view)
    with pytest.raises(ExchangeError, match="object type"):
        export_geojson(ws, cfg, slide_id, view, object_type="cell")


def test_cli_import_names_the_failed_files_and_exits_1_and_exports_run(cohort, tmp_path) -> None:
    ws, slides = cohort
    folder, _ = trident_folder(tmp_path, slides[:1], np.random.default_rng(2), n=4)
    write_trident(folder / "unknown-slide.h5", np.ones((1, DIM)), [[0, 0]], patch_size=64, src_mag=20, target_mag=20,
                  width=100, height=100)
    runner = CliRunner()
    out = runner.invoke(app, ["--workspace", str(ws.root), "import", "trident", str(folder)], env={"COLUMNS": "250"})
    assert out.exit_code == 1, out.output
    assert "unknown-slide.h5" in out.output and "imported" in out.output
    view_id = import_features(ws, ws.config(), "trident", folder).view.view_id
    h5ad = tmp_path / "v.h5ad"
    out = runner.invoke(app, ["--workspace", str(ws.root), "export", "anndata", view_id, "--out", str(h5ad)])
    assert out.exit_code == 0, out.output and h5ad.is_file()
    out = runner.invoke(app, ["--workspace", str(ws.root), "export", "geojson", slides[0]["slide_id"], "--view", view_id,
                              "--out", str(tmp_path / "g.geojson")])
    assert out.exit_code == 0, out.output
    assert len(json.loads((tmp_path / "g.geojson").read_text())["features"]) == 4
    out = runner.invoke(app, ["--workspace", str(ws.root), "export", "h5", "fv-nonexistent"])
    assert out.exit_code == 2 and "no feature view 'fv-nonexistent'" in out.output
