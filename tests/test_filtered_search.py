"""Filtered tile search: the path TileSearcher chooses for a filter (exact over the few rows a selective filter
keeps, the index over every row with a widened k for a loose one, a prefiltered index search in between), and
every path giving the hits of an exact filtered search, on real LanceDB tables with the indices the product
builds (features.upkeep)."""

from __future__ import annotations

import numpy as np
import pytest

from histcode.config import FeaturesConfig
from histcode.features.search import FilterError, TileSearcher
from histcode.features.upkeep import maintain_tables
from histcode.store.vectors import TILE_KIND, TableSpec, connect, open_table, to_batch

N, DIM, PER_SLIDE = 6000, 16, 100
# IVF_FLAT probing every partition: each ANN path is exact, so the paths can be compared hit for hit
CFG = FeaturesConfig(index_min_rows=1000, index_type="IVF_FLAT", index_partitions=4, nprobes=4, refine_factor=None,
                     search_exact_rows=500, search_postfilter_fraction=0.2)
STRATEGIES = ("exact", "prefilter", "postfilter")


def slides(ids) -> str:
    return "slide_id IN (" + ", ".join(f"'s{i}'" for i in ids) + ")"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, DIM))
    data = (centres[rng.integers(0, 20, N)] + rng.normal(scale=0.5, size=(N, DIM))).astype(np.float32)
    slide = np.arange(N) // PER_SLIDE
    spec = TableSpec("fv-filtered", TILE_KIND, DIM, "synthetic", attribute_columns=("subtype",))
    table = open_table(connect(tmp_path_factory.mktemp("filtered") / "lance"), spec)
    table.add(to_batch(spec, {"tile_id": [f"t{i}" for i in range(N)], "slide_id": [f"s{s}" for s in slide],
                              "patient_id": [f"p{s // 2}" for s in slide], "x": np.arange(N) % 40, "y": [0] * N,
                              "size": [256] * N, "subtype": np.where(slide % 2 == 0, "LUAD", "LUSC"),
                              "vector": data}))
    notes = maintain_tables({TILE_KIND: table}, CFG, changed=True)
    return table, data, slide, notes


def exact_hits(data: np.ndarray, allowed: np.ndarray, q: int, k: int, exclude: bool = False) -> list[str]:
    rows = np.flatnonzero(allowed)
    if exclude:
        rows = rows[rows != q]
    unit = data[rows].astype(np.float64) / np.linalg.norm(data[rows].astype(np.float64), axis=1, keepdims=True)
    query = data[q].astype(np.float64) / np.linalg.norm(data[q].astype(np.float64))
    return [f"t{rows[i]}" for i in np.argsort(-(unit @ query), kind="stable")[:k]]


def test_the_vector_index_comes_with_filter_indices(store) -> None:
    table, _, _, notes = store
    kinds = {ix.columns[0]: str(ix.index_type) for ix in table.list_indices()}
    assert kinds["patient_id"] == "BTree" and kinds["subtype"] == "Bitmap" and kinds["slide_id"] == "BTree"
    assert any("filter indices on patient_id, subtype" in n for n in notes)
    assert not any("filter indices" in n for n in maintain_tables({TILE_KIND: table}, CFG, changed=False))


def test_the_chooser_picks_each_path_by_the_rows_a_filter_keeps(store) -> None:
    table, *_ = store
    searcher = TileSearcher(table, CFG)
    assert searcher.strategy(None) == "ann"
    assert searcher.strategy(slides(range(3))) == "exact" and searcher.selective(slides(range(3)))  # 300 rows
    assert searcher.strategy(slides(range(10))) == "prefilter"  # 1,000 rows: 1/6 of the table
    assert searcher.strategy("subtype = 'LUSC'") == "postfilter"  # half
    assert searcher.strategy("patient_id != 'p0'") == "postfilter" and not searcher.selective("patient_id != 'p0'")
    assert searcher.matching("subtype = 'LUSC'") == N // 2
    empty = TileSearcher(table, CFG.model_copy(update={"search_exact_rows": 0, "search_postfilter_fraction": 1.0}))
    assert empty.strategy(slides(range(3))) == "prefilter"


@pytest.mark.parametrize("where, allowed", [
    (slides([3, 17, 40]), lambda s: np.isin(s, [3, 17, 40])),
    (slides(range(10)), lambda s: s < 10),
    ("subtype = 'LUSC'", lambda s: s % 2 == 1),
    ("patient_id = 'p7' AND x < 20", lambda s: (s // 2 == 7) & (np.arange(N) % 40 < 20)),
])
def test_every_path_returns_the_exact_filtered_hits(store, where, allowed) -> None:
    table, data, slide, _ = store
    searcher = TileSearcher(table, CFG)
    mask = allowed(slide)
    for q in (0, 1234, 5999, int(np.flatnonzero(mask)[5])):
        want = exact_hits(data, mask, q, 10, exclude=True)
        for how in (None, *STRATEGIES):
            hits = searcher.nearest(data[q], 10, where, exclude=f"t{q}", strategy=how)
            assert hits.column("tile_id").to_pylist() == want, (where, how, q)
            assert hits.column("rank").to_pylist() == list(range(1, 11))
            assert np.all(np.diff(hits.column("distance").to_numpy()) >= 0)
            assert "vector" not in hits.column_names and "size" not in hits.column_names


def test_k_hits_whenever_k_rows_match(store) -> None:
    """A postfilter whose widened candidates hold too few matches widens again, and past its limit hands over
    to the prefiltered search; a filter keeping fewer than k rows gives all of them."""
    table, data, slide, _ = store
    searcher = TileSearcher(table, CFG)
    far = int(np.argmax(data[:, 0]))
    few = [f"t{i}" for i in range(0, N, 500)]  # 12 rows, spread over the table
    where = "tile_id IN (" + ", ".join(f"'{t}'" for t in few) + ")"
    mask = np.isin(np.arange(N), [int(t[1:]) for t in few])
    for how in (None, *STRATEGIES):
        assert searcher.nearest(data[far], 10, where, strategy=how).column("tile_id").to_pylist() == \
            exact_hits(data, mask, far, 10), how
        assert searcher.nearest(data[far], 20, where, strategy=how).num_rows == 12, how
    assert searcher.nearest(data[0], 10, "slide_id = 'nope'").num_rows == 0
    assert searcher.nearest(data[0], 10, "slide_id = 'nope'", strategy="postfilter").num_rows == 0


def test_a_bad_filter_is_a_filter_error_on_every_path(store) -> None:
    table, data, _, _ = store
    searcher = TileSearcher(table, CFG)
    for how in (None, *STRATEGIES):
        with pytest.raises(FilterError, match=r"cannot filter tile_emb__fv_filtered by 'no_such_column = 1'.*columns: tile_id"):
            searcher.nearest(data[0], 5, "no_such_column = 1", strategy=how)


def test_a_table_without_an_index_is_searched_exactly(tmp_path) -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(size=(300, DIM)).astype(np.float32)
    spec = TableSpec("fv-small", TILE_KIND, DIM, "synthetic")
    table = open_table(connect(tmp_path / "lance"), spec)
    table.add(to_batch(spec, {"tile_id": [f"t{i}" for i in range(300)], "slide_id": [f"s{i // 100}" for i in range(300)],
                              "patient_id": ["p"] * 300, "x": [0] * 300, "y": [0] * 300, "size": [256] * 300,
                              "vector": data}))
    searcher = TileSearcher(table, CFG)
    assert searcher.kind is None and searcher.strategy("slide_id != 's0'") == "exact"
    mask = np.arange(300) >= 100
    assert searcher.nearest(data[7], 5, "slide_id != 's0'").column("tile_id").to_pylist() == exact_hits(data, mask, 7, 5)
