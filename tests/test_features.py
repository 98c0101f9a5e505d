"""The feature store: materialised rows, idempotence, crash safety, dimension checks, reads, SQL, search."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from histcode.config import FeaturesConfig
from histcode.features.embed import materialize
from histcode.features.read import slide_features, tile_features, training_set
from histcode.features.registry import load_view
from histcode.features.search import SearchError, nearest, search
from histcode.features.upkeep import maintain_tables
from histcode.store.catalog import Catalog
from histcode.store.sql import ReadOnlyQueryError, run_sql
from histcode.store.vectors import TILE_KIND, TableSpec, VectorStoreError, connect, open_table, to_batch, upsert_slides
from histcode.tiling.spec import spec_id_of
from tests.conftest import TINY_PRETRAIN


def _view(ws):
    return load_view(Catalog.of(ws), None, ws.config().features.attribute_columns)


def _catalog_tiles(ws) -> set[str]:
    return set(Catalog.of(ws).tiles(spec_id=spec_id_of(ws.config().tiling)).column("tile_id").to_pylist())


def test_materialized_rows_equal_the_catalog_tiles(embedded_workspace) -> None:
    ws = embedded_workspace
    view = _view(ws)
    tiles = tile_features(ws, view, fmt="pandas")
    assert len(tiles) == len(set(tiles.tile_id)) and set(tiles.tile_id) == _catalog_tiles(ws)
    assert view.dim == 256 and np.stack(tiles.vector).shape == (len(tiles), 256)
    slides = slide_features(ws, view, fmt="pandas")
    assert set(slides.slide_id) == set(tiles.slide_id)
    one = slides.iloc[0]
    mine = np.stack(tiles[tiles.slide_id == one.slide_id].vector)
    np.testing.assert_allclose(np.asarray(one.vector), mine.mean(axis=0), rtol=1e-5, atol=1e-6)  # mean pooling
    assert one.n_tiles == len(mine) and one.subtype in ("LUAD", "LUSC", None)
    ledger = Catalog.of(ws).query("SELECT status, sum(rows) AS n FROM materializations GROUP BY 1")
    assert ledger == [{"status": "ok", "n": len(tiles)}]


def test_rerun_is_idempotent(embedded_workspace, copy_workspace) -> None:
    ws = copy_workspace(embedded_workspace)
    before = tile_features(ws, fmt="arrow").num_rows
    report = materialize(ws, ws.config(), progress=False)
    assert report.count("embedded") == 0 and report.count("skipped") > 0 and report.tiles_embedded == 0
    assert tile_features(ws, fmt="arrow").num_rows == before


def test_writes_of_another_dimension_or_view_are_refused(embedded_workspace, tmp_path) -> None:
    view = _view(embedded_workspace)
    spec = view.table(TILE_KIND)
    cols = {"tile_id": ["t"], "slide_id": ["s"], "patient_id": ["p"], "x": [0], "y": [0], "size": [256],
            "sample_type": [None], "subtype": [None]}
    with pytest.raises(VectorStoreError, match=r"shape \(1, 8\) do not fit view .* \(dim 256"):
        to_batch(spec, {**cols, "vector": np.zeros((1, 8))})
    db = connect(embedded_workspace.lancedb_dir)
    other = TableSpec(spec.view_id, TILE_KIND, 512, spec.encoder_uri)
    with pytest.raises(VectorStoreError, match="at dim 256, not view .* at dim 512"):
        open_table(db, other)
    foreign = TableSpec("fv-other", TILE_KIND, 512, "models:/x/1")
    table = open_table(connect(tmp_path / "lance"), foreign)
    with pytest.raises(VectorStoreError, match="vector type"):
        upsert_slides(table, foreign, pa.table({"vector": pa.array([[0.0] * 4], pa.list_(pa.float32(), 4))}), ["s"])
    with pytest.raises(VectorStoreError, match="not finite"):
        to_batch(spec, {**cols, "vector": np.full((1, 256), np.nan)})


def _cosine_topk(matrix: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    m = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    q = query / np.linalg.norm(query)
    dist = 1 - m @ q
    order = np.argsort(dist, kind="stable")[:k]
    return order, dist[order]


def test_search_equals_brute_force(embedded_workspace) -> None:
    ws = embedded_workspace
    view, cfg = _view(ws), ws.config().features
    tiles = tile_features(ws, view, fmt="pandas")
    matrix = np.stack(tiles.vector).astype(np.float64)
    query_id = tiles.tile_id.iloc[5]
    hits = search(ws, view, cfg, tile_id=query_id, k=7)
    others = tiles.index[tiles.tile_id != query_id]
    order, dist = _cosine_topk(matrix[others], matrix[5], 7)
    assert hits.column("tile_id").to_pylist() == tiles.tile_id[others].iloc[order].tolist()
    np.testing.assert_allclose(hits.column("distance").to_numpy(), dist, atol=1e-4)
    assert hits.column("rank").to_pylist() == list(range(1, 8))
    # with a filter on a slide attribute
    subtype = tiles.subtype.dropna().iloc[0]
    hits = search(ws, view, cfg, tile_id=query_id, k=5, where=f"subtype = '{subtype}'")
    keep = tiles.index[(tiles.tile_id != query_id) & (tiles.subtype == subtype)]
    order, _ = _cosine_topk(matrix[keep], matrix[5], 5)
    assert hits.column("tile_id").to_pylist() == tiles.tile_id[keep].iloc[order].tolist()
    # slides: the query slide is never its own neighbour
    slide = tiles.slide_id.iloc[0]
    hits = search(ws, view, cfg, slide_id=slide, k=3)
    assert slide not in hits.column("slide_id").to_pylist() and hits.num_rows == 3


def test_image_search_and_errors(embedded_workspace, tiny_cohort, tmp_path) -> None:
    ws = embedded_workspace
    view, cfg = _view(ws), ws.config().features
    from PIL import Image

    from histcode.wsi.tile_reader import TileReader

    tiles = tile_features(ws, view, fmt="pandas")
    row = tiles.iloc[3]
    slide = Catalog.of(ws).get_slide(row.slide_id)
    with TileReader.for_slide(slide, int(row["size"]), view.image_px) as reader:
        Image.fromarray(reader.read(int(row.x), int(row.y))).save(tmp_path / "q.png")
    hits = search(ws, view, cfg, image=tmp_path / "q.png", k=1)
    assert hits.column("tile_id").to_pylist() == [row.tile_id]  # the tile itself is its own nearest neighbour
    # a loose image is read as it is, the stored tile through its slide's stain normalisation: close, not equal
    assert hits.column("distance")[0].as_py() < 0.1
    # the same tile as the view read it (normalised by its slide's stain) is the stored vector
    from histcode.features.registry import resolve_encoder
    from histcode.ssl.dataset import dataset_from_catalog
    from histcode.ssl.stain_norm import normalise_dataset, parse
    from histcode.tracking import Tracker

    tags = resolve_encoder(Tracker(ws), view.encoder_uri)[2]
    assert parse(tags["stain_norm"]).method == "macenko"
    dataset = dataset_from_catalog(Catalog.of(ws), view.spec_id, view.image_px, slide_ids=[row.slide_id])
    normalise_dataset(dataset, parse(tags["stain_norm"]))
    tile = dataset[dataset.tile_ids.index(row.tile_id)].numpy().transpose(1, 2, 0)
    dataset.close()
    Image.fromarray(tile).save(tmp_path / "seen.png")
    hits = search(ws, view, cfg, image=tmp_path / "seen.png", k=1)
    assert hits.column("tile_id").to_pylist() == [row.tile_id] and hits.column("distance")[0].as_py() < 1e-3
    with pytest.raises(SearchError, match="exactly one"):
        search(ws, view, cfg, k=1)
    with pytest.raises(SearchError, match="no vector in view"):
        search(ws, view, cfg, tile_id="nope", k=1)
    with pytest.raises(SearchError, match="cannot read query image"):
        search(ws, view, cfg, image=tmp_path / "missing.png", k=1)
    with pytest.raises(SearchError, match=r"cannot filter .* by .no_such_column = 1.: .*No field named no_such_column \(columns: tile_id, "):
        search(ws, view, cfg, tile_id=row.tile_id, k=1, where="no_such_column = 1")


def test_ann_index_recall(tmp_path) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, 64))
    data = (centers[rng.integers(0, 50, 20000)] + rng.normal(scale=0.6, size=(20000, 64))).astype(np.float32)
    spec = TableSpec("fv-synthetic", TILE_KIND, 64, "synthetic")
    table = open_table(connect(tmp_path / "lance"), spec)
    n = len(data)
    ids = [f"t{i}" for i in range(n)]
    batch = to_batch(spec, {"tile_id": ids, "slide_id": ["s"] * n, "patient_id": ["p"] * n, "x": [0] * n, "y": [0] * n,
                            "size": [256] * n, "vector": data})
    upsert_slides(table, spec, batch, ["s"])
    cfg = FeaturesConfig(index_min_rows=1000)
    notes = maintain_tables({TILE_KIND: table}, cfg, changed=True)
    assert any("IVF_HNSW_SQ index" in n for n in notes)
    queries = rng.choice(n, 50, replace=False)
    recall = []
    for q in queries:
        exact, _ = _cosine_topk(data.astype(np.float64), data[q], 10)
        got = nearest(table, data[q], 10, None, cfg).column("tile_id").to_pylist()
        recall.append(len({ids[i] for i in exact} & set(got)) / 10)
    assert np.mean(recall) >= 0.9, np.mean(recall)


def test_a_selective_filter_is_searched_exactly_and_a_broad_one_through_the_index(tmp_path) -> None:
    """Filtered search: an IVF index probed for a few slides misses their neighbours, so a filter leaving fewer
    than index_min_rows rows is answered by a flat scan of them (exact); a broad one uses the index."""
    from histcode.features.search import TileSearcher

    rng = np.random.default_rng(1)
    n, dim = 20000, 32
    data = rng.normal(size=(n, dim)).astype(np.float32)  # isotropic: the index alone recalls few neighbours
    spec = TableSpec("fv-filter", TILE_KIND, dim, "synthetic")
    table = open_table(connect(tmp_path / "lance"), spec)
    slides = [f"s{i // 100}" for i in range(n)]
    table.add(to_batch(spec, {"tile_id": [f"t{i}" for i in range(n)], "slide_id": slides, "patient_id": slides,
                              "x": [0] * n, "y": [0] * n, "size": [256] * n, "vector": data}))
    cfg = FeaturesConfig(index_min_rows=1000, nprobes=1, refine_factor=1)
    maintain_tables({TILE_KIND: table}, cfg, changed=True)
    searcher = TileSearcher(table, cfg)
    where = "slide_id IN ('s3', 's4', 's5')"
    assert searcher.selective(where) and not searcher.selective("slide_id != 's3'") and not searcher.selective(None)
    assert "use_index" not in searcher.query(data[0], 10, "slide_id != 's3'") and searcher.kind == "IvfHnswSq"
    allowed = np.flatnonzero(np.isin(np.array(slides), ["s3", "s4", "s5"]))
    for q in (0, 7, 450):
        exact, _ = _cosine_topk(data[allowed].astype(np.float64), data[q], 10)
        got = searcher.nearest(data[q], 10, where).column("tile_id").to_pylist()
        assert got == [f"t{allowed[i]}" for i in exact]
    own = allowed[3]  # a query tile inside the filter is left out of its own hits, which stay k and ranked
    others = allowed[allowed != own]
    exact, _ = _cosine_topk(data[others].astype(np.float64), data[own], 10)
    hits = searcher.nearest(data[own], 10, where, exclude=f"t{own}")
    assert hits.column("tile_id").to_pylist() == [f"t{others[i]}" for i in exact]
    assert hits.column("rank").to_pylist() == list(range(1, 11))


def test_slide_batches_and_shards_keep_slides_whole(tiled_workspace) -> None:
    """Batches never span two slides (so a slide's vectors do not depend on its neighbours in the run), and
    shards are runs of whole slides covering every tile once, balanced by tile count."""
    from histcode.features.embed import SlideBatches
    from histcode.features.shards import shards
    from histcode.ssl.dataset import dataset_from_catalog

    dataset = dataset_from_catalog(Catalog.of(tiled_workspace), spec_id_of(tiled_workspace.config().tiling), 32)
    slide_of = dataset.tiles[:, 0]
    batches = list(SlideBatches(slide_of, 5))
    assert len(batches) == len(SlideBatches(slide_of, 5))
    assert [i for b in batches for i in b] == list(range(len(dataset)))
    assert all(len(set(slide_of[b])) == 1 and len(b) <= 5 for b in batches)
    for workers in (1, 2, 3, 50):
        parts = shards(dataset, workers)
        assert 1 <= len(parts) <= min(workers, len(dataset.slides))
        assert [t for p in parts for t in p.tile_ids] == dataset.tile_ids
        assert [s.slide_id for p in parts for s in p.slides] == [s.slide_id for s in dataset.slides]
        for p in parts:  # each shard's tiles index its own slide list
            assert [p.slides[i].slide_id for i in p.tiles[:, 0]] == [dataset.slides[i].slide_id
                                                                   for i in dataset.tiles[np.isin(dataset.tile_ids, p.tile_ids), 0]]
    two = shards(dataset, 2)
    if len(two) == 2:
        assert abs(len(two[0]) - len(two[1])) <= max(np.bincount(slide_of))


def test_read_formats_and_training_set(embedded_workspace) -> None:
    ws = embedded_workspace
    vectors, meta = tile_features(ws, fmt="torch")
    assert vectors.shape == (len(meta), 256) and "tile_id" in meta
    some = meta.tile_id.iloc[:3].tolist()
    assert tile_features(ws, tile_ids=some, fmt="pandas").tile_id.tolist() == some
    slides = slide_features(ws, fmt="pandas")
    labels = pd.DataFrame({"slide_id": slides.slide_id, "tumour": [s.endswith("01Z-00-DX1") for s in slides.slide_id]})
    frame = training_set(ws, labels, "tumour", folds=2)
    assert frame.groupby("patient_id").fold.nunique().max() == 1  # a patient is never in two folds
    assert set(frame.fold) == {0, 1}
    with pytest.raises(ValueError, match="cannot fill 50 folds"):
        training_set(ws, labels, "tumour", folds=50)


def test_as_of_returns_the_older_state(embedded_workspace, copy_workspace) -> None:
    ws = copy_workspace(embedded_workspace)
    view = _view(ws)
    table = open_table(connect(ws.lancedb_dir), view.table(TILE_KIND))
    before = table.count_rows()
    extra = tile_features(ws, view, fmt="pandas").head(2).copy()
    extra["tile_id"] = ["new-1", "new-2"]
    extra["slide_id"] = "synthetic-slide"
    batch = to_batch(view.table(TILE_KIND), {c: extra[c].tolist() for c in extra.columns if c != "vector"}
                     | {"vector": np.stack(extra.vector)})
    upsert_slides(table, view.table(TILE_KIND), batch, ["synthetic-slide"])
    assert tile_features(ws, view, fmt="arrow").num_rows == before + 2
    assert tile_features(ws, view, as_of="first", fmt="arrow").num_rows == before  # the tag made by embed
    with pytest.raises(SearchError, match="no vector"):  # search reads the last ledger commit: no ledger row, unseen
        search(ws, view, ws.config().features, tile_id="new-1", k=3, as_of=None)
    hits = search(ws, view, ws.config().features, tile_id="new-1", k=3, as_of=table.version)
    assert hits.num_rows == 3
    with pytest.raises(SearchError, match="no vector"):
        search(ws, view, ws.config().features, tile_id="new-1", k=3, as_of="first")
    with pytest.raises(ValueError, match="no version or tag 'nope'"):
        tile_features(ws, view, as_of="nope")


def test_sql_reads_everything_and_writes_nothing(embedded_workspace) -> None:
    ws = embedded_workspace
    sql = lambda q: run_sql(ws, q, _view(ws).view_id)  # noqa: E731 -- tile_embeddings = the view the caller names
    counts = sql("SELECT slide_id, count(*) AS n FROM tile_embeddings GROUP BY 1").to_pandas()
    tiles = Catalog.of(ws).query("SELECT slide_id, count(*) AS n FROM tiles GROUP BY 1")
    assert dict(zip(counts.slide_id, counts.n)) == {r["slide_id"]: r["n"] for r in tiles}
    near = sql("""
        WITH q AS (SELECT vector FROM tile_embeddings ORDER BY tile_id LIMIT 1)
        SELECT t.tile_id, array_cosine_distance(t.vector, q.vector) AS d
        FROM tile_embeddings t, q ORDER BY d LIMIT 3""").to_pandas()
    assert near.d.iloc[0] == pytest.approx(0, abs=1e-5) and near.d.is_monotonic_increasing
    joined = sql("SELECT count(*) AS n FROM slide_embeddings e JOIN slides s USING (slide_id) "
                         "WHERE s.attributes->>'sample_type' = 'tumor'").to_pylist()[0]["n"]
    assert joined > 0
    view = _view(ws)
    per_view = run_sql(ws, f"SELECT count(*) AS n FROM {view.table(TILE_KIND).name}").to_pylist()[0]["n"]
    assert per_view == counts.n.sum()
    for statement in ("DELETE FROM slides", "DROP TABLE tiles", "CREATE TABLE x AS SELECT 1", "INSERT INTO tiles SELECT * FROM tiles",
                      "COPY slides TO 'x.csv'", "ATTACH 'other.db'", "SET threads = 1", "SELECT 1; DELETE FROM slides"):
        with pytest.raises(ReadOnlyQueryError, match="refused: `histcode sql` is read-only"):
            run_sql(ws, statement)
    with pytest.raises(Exception, match="Permission"):
        run_sql(ws, "SELECT * FROM read_csv('/etc/hostname')")


def test_spawned_reader_processes_give_the_same_vectors(embedded_workspace, copy_workspace) -> None:
    ws = copy_workspace(embedded_workspace)
    before = tile_features(ws, fmt="pandas").sort_values("tile_id")
    (ws.root / "params.yaml").write_text(yaml.safe_dump({"pretrain": TINY_PRETRAIN, "features": {"num_workers": 1}}))
    with Catalog.of(ws).transaction() as con:
        con.execute("DELETE FROM materializations")  # forget the work: every slide is embedded again
    report = materialize(ws, ws.config(), progress=False)
    assert report.tiles_embedded == len(before)
    after = tile_features(ws, fmt="pandas").sort_values("tile_id")
    assert after.tile_id.tolist() == before.tile_id.tolist()
    np.testing.assert_allclose(np.stack(after.vector), np.stack(before.vector), atol=1e-5)


def test_a_slide_whose_content_changes_leaves_every_feature_view_at_once(embedded_workspace, copy_workspace,
                                                                         other_cohort, tmp_path) -> None:
    from histcode.ingest.run import ingest_sources
    from histcode.ingest.sources import SlideSource
    from histcode.ssl.pretrain import register_baseline_encoder

    ws = copy_workspace(embedded_workspace)
    cfg = ws.config()
    version = register_baseline_encoder(ws, cfg, "random")  # a second view of the same slides
    materialize(ws, cfg, encoder=f"histcode-encoder/{version}", progress=False)
    catalog = Catalog.of(ws)
    views = [r["view_id"] for r in catalog.query("SELECT DISTINCT view_id FROM feature_views")]
    assert len(views) == 2
    slide = catalog.slides(status="ok")[0]
    sid = slide["slide_id"]
    counts = lambda: [(tile_features(ws, v, slide_ids=[sid], fmt="arrow").num_rows,  # noqa: E731
                       slide_features(ws, v, slide_ids=[sid], fmt="arrow").num_rows) for v in views]
    assert all(t > 0 and s == 1 for t, s in counts())
    # the same accession now names other pixels
    new_file = tmp_path / "rescanned.svs"
    new_file.write_bytes(next(other_cohort.out_dir.glob("slides/*.svs")).read_bytes())
    (outcome,) = ingest_sources([SlideSource(new_file, sid, slide["patient_id"])], catalog, cfg.ingest,
                                progress=False).outcomes
    assert outcome.action == "changed"
    assert counts() == [(0, 0), (0, 0)]  # gone from both views' tile and slide tables
    assert run_sql(ws, f"SELECT count(*) AS n FROM tile_embeddings WHERE slide_id = '{sid}'",
                   _view(ws).view_id).column("n")[0].as_py() == 0
    other = [s for s in catalog.slides(status="ok") if s["slide_id"] != sid][0]["slide_id"]
    hits = search(ws, _view(ws), cfg.features, slide_id=other, k=50)
    assert sid not in hits.column("slide_id").to_pylist()
    assert not catalog.query("SELECT * FROM materializations WHERE slide_id = ?", [sid])
