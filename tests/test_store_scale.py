"""The store's cohort-scale behaviour on real LanceDB tables: id indices with the tables, upserts that replace a
slide's rows through them, maintenance scheduled by size, and training bags built a few slides at a time."""

from __future__ import annotations

import os

import numpy as np
import pytest

from histcode.config import FeaturesConfig
from histcode.features.read import slide_chunks, tile_features
from histcode.features.upkeep import maintain_tables, unindexed_rows
from histcode.heads.data import load_bags
from histcode.store.vectors import (
    SLIDE_KIND,
    TILE_KIND,
    TableSpec,
    VectorStoreError,
    connect,
    indexed_columns,
    open_table,
    to_batch,
    upsert_slides,
)

DIM = 8


def _tiles(spec: TableSpec, slides: dict[str, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    sids = [s for s, n in slides.items() for _ in range(n)]
    idx = [i for n in slides.values() for i in range(n)]
    cols = {"tile_id": [f"{s}:{i}" for s, i in zip(sids, idx)], "slide_id": sids, "patient_id": sids,
            "x": [256 * i for i in idx], "y": [0] * len(sids), "size": [256] * len(sids),
            "vector": rng.normal(size=(len(sids), DIM))}
    return to_batch(spec, cols)


def _rows(table) -> dict[str, list[str]]:
    data = table.to_arrow()
    out: dict[str, list[str]] = {}
    for sid, tid in zip(data.column("slide_id").to_pylist(), data.column("tile_id").to_pylist()):
        out.setdefault(sid, []).append(tid)
    return {k: sorted(v) for k, v in out.items()}


def test_tables_are_created_with_id_indices_and_old_tables_get_them(tmp_path) -> None:
    db = connect(tmp_path / "lance")
    tiles = open_table(db, TableSpec("fv-a", TILE_KIND, DIM, "models:/x/1"))
    slides = open_table(db, TableSpec("fv-a", SLIDE_KIND, DIM, "models:/x/1"))
    assert indexed_columns(tiles) == {"tile_id", "slide_id"} and indexed_columns(slides) == {"slide_id"}
    spec = TableSpec("fv-old", TILE_KIND, DIM, "models:/x/1")
    db.create_table(spec.name, schema=spec.schema())  # a table written before the indices existed
    assert indexed_columns(open_table(db, spec, create=False)) == set()  # readers change nothing
    assert indexed_columns(open_table(db, spec)) == {"tile_id", "slide_id"}  # a writer adds them


def test_upsert_replaces_each_listed_slide_and_leaves_the_others(tmp_path) -> None:
    spec = TableSpec("fv-a", TILE_KIND, DIM, "models:/x/1")
    table = open_table(connect(tmp_path / "lance"), spec)
    upsert_slides(table, spec, _tiles(spec, {"A": 5, "B": 4, "C": 3}), ["A", "B", "C"])
    # A re-tiled with fewer tiles (its stale rows go), B re-embedded as it was, C listed without rows (removed)
    new = _tiles(spec, {"A": 2, "B": 4}, seed=1)
    upsert_slides(table, spec, new, ["A", "B", "C"])
    assert _rows(table) == {"A": ["A:0", "A:1"], "B": [f"B:{i}" for i in range(4)]}
    got = table.to_lance().to_table(filter="tile_id = 'B:2'").column("vector").to_pylist()[0]
    want = new.filter(np.array(new.column("tile_id").to_pylist()) == "B:2").column("vector").to_pylist()[0]
    np.testing.assert_allclose(got, want)  # replaced by the new vector, not kept
    with pytest.raises(VectorStoreError, match=r"rows of slides \['D'\] that the write does not list"):
        upsert_slides(table, spec, _tiles(spec, {"D": 1}), ["A"])
    assert "D" not in _rows(table)


def test_maintenance_runs_when_enough_rows_are_unindexed(tmp_path) -> None:
    spec = TableSpec("fv-a", TILE_KIND, DIM, "models:/x/1")
    table = open_table(connect(tmp_path / "lance"), spec)
    upsert_slides(table, spec, _tiles(spec, {"A": 30}), ["A"])
    cfg = FeaturesConfig(optimize_every_rows=50, index_min_rows=10**9)
    assert maintain_tables({TILE_KIND: table}, cfg, changed=True) == []  # 30 unindexed rows: nothing due
    assert unindexed_rows(table) == 30
    upsert_slides(table, spec, _tiles(spec, {"B": 30}), ["B"])
    notes = maintain_tables({TILE_KIND: table}, cfg, changed=True)
    assert len(notes) == 1 and "60 rows unindexed" in notes[0] and unindexed_rows(table) == 0
    # rows after an update are still found, through the index and the unindexed fragments together
    upsert_slides(table, spec, _tiles(spec, {"A": 3, "C": 2}), ["A", "C"])
    assert _rows(table) == {"A": ["A:0", "A:1", "A:2"], "B": sorted(f"B:{i}" for i in range(30)), "C": ["C:0", "C:1"]}
    many = maintain_tables({TILE_KIND: table}, FeaturesConfig(optimize_max_fragments=1, index_min_rows=10**9),
                           changed=True)
    assert "fragments" in many[0]


def test_bags_are_read_a_few_slides_at_a_time_and_match_the_whole_view(embedded_workspace) -> None:
    ws = embedded_workspace
    from histcode.features.read import _view, view_table

    view = _view(ws, None)
    table = view_table(ws, view, TILE_KIND)
    chunks = list(slide_chunks(table, max_rows=1))
    slides = set(tile_features(ws, view, fmt="arrow").column("slide_id").to_pylist())
    assert len(chunks) == len(slides)  # one slide per chunk when a slide alone passes max_rows
    whole = tile_features(ws, view, fmt="pandas")
    bags = load_bags(ws, view, chunk_rows=50)
    assert set(bags) == slides
    for sid, g in whole.groupby("slide_id"):
        g = g.sort_values(["y", "x"])
        bag = bags[sid]
        assert list(bag.tile_ids) == g.tile_id.tolist() and bag.patient_id == g.patient_id.iloc[0]
        assert bag.tile_ids == g.tile_id.tolist() and bag.tile_ids[-1] == g.tile_id.iloc[-1]  # a sequence of str
        np.testing.assert_array_equal(bag.features, np.stack(g.vector.to_numpy()).astype(np.float32))
        np.testing.assert_array_equal(bag.xy, g[["x", "y"]].to_numpy())
        assert bag.size == int(g["size"].iloc[0]) and isinstance(bag.features, np.ndarray)
    assert not list(ws.data_dir.glob("bags-*"))  # the mapped file is unlinked at once
    some = sorted(slides)[:2]
    assert set(load_bags(ws, view, slide_ids=some)) == set(some)


def test_malloc_arenas_are_capped_unless_the_user_set_them() -> None:
    """The CLI caps glibc's malloc arenas before any store is read (Lance's reader threads otherwise grow the
    process by fragmentation); a MALLOC_ARENA_MAX in the environment is left to glibc."""
    import subprocess
    import sys

    code = "from histcode.runtime import limit_malloc_arenas; print(limit_malloc_arenas())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    capped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert capped.stdout.strip() == "True"  # glibc, as on every machine this project runs on
    user = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_ARENA_MAX": "4"}, capture_output=True,
                          text=True, check=True)
    assert user.stdout.strip() == "False"

