"""Held-aside demo slides (``demo.source_split: val``): composed of LC25000 tiles that no training demo slide
holds, checked cell by cell against the source's own labels.csv."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from tests.conftest import TINY_DEMO


def _split_of_source() -> pd.DataFrame:
    from histcode.workspace import bundled_source_dir

    labels = pd.read_csv(bundled_source_dir() / "labels.csv")
    labels["source"] = labels.path.map(os.path.basename)
    assert labels.source.is_unique  # provenance names a tile by its file name
    return labels.set_index("source")


def _placed(cohort) -> pd.DataFrame:
    cells = pd.read_csv(cohort.out_dir / "provenance.csv")
    return cells[cells.source.notna()]


def test_a_val_cohort_is_built_of_val_tiles_only(tiny_cohort, tmp_path):
    from histcode.demo.build import build_demo_cohort

    split = _split_of_source()
    held = build_demo_cohort(TINY_DEMO.model_copy(update={"source_split": "val"}), tmp_path / "held", progress=False)
    cells = _placed(held)
    assert held.n_slides > 0 and len(cells) > 0
    assert cells.source.isin(split.index).all()
    assert set(split.loc[cells.source, "split"]) == {"val"}
    assert (split.loc[cells.source, "group_id"].to_numpy() == cells.group_id.to_numpy()).all()
    assert set(cells.label) == {"lung_n", "lung_aca", "lung_scc"}
    # the training build (the session's tiny cohort) is all train tiles: the two never share a tile or a group
    train = _placed(tiny_cohort)
    assert set(split.loc[train.source, "split"]) == {"train"}
    assert not set(train.group_id) & set(cells.group_id)
    assert set(pd.read_csv(held.manifest).columns) >= {"slide_id", "sample_type", "mask", "mask_mpp"}


def test_the_split_is_part_of_the_cohort_fingerprint(tmp_path):
    from histcode.demo.build import build_demo_cohort

    cfg = TINY_DEMO.model_copy(update={"n_patients": 2, "canvas_cells": (4, 5)})
    out = tmp_path / "demo"
    assert build_demo_cohort(cfg, out, progress=False).built
    assert not build_demo_cohort(cfg.model_copy(update={"source_split": "train"}), out, progress=False).built
    val = build_demo_cohort(cfg.model_copy(update={"source_split": "val"}), out, progress=False)
    assert val.built  # another split is another cohort, not "up to date"
    assert set(_split_of_source().loc[_placed(val).source, "split"]) == {"val"}


def test_the_val_split_is_too_small_for_a_full_size_cohort(tmp_path):
    from histcode.demo.build import build_demo_cohort
    from histcode.demo.plan import DemoSourceError

    with pytest.raises(DemoSourceError, match="lower demo.n_patients"):  # 34 benign val groups
        build_demo_cohort(TINY_DEMO.model_copy(update={"source_split": "val", "n_patients": 40}), tmp_path / "d",
                          progress=False)
    with pytest.raises(DemoSourceError, match="test split"):
        build_demo_cohort(TINY_DEMO.model_copy(update={"source_split": "test"}), tmp_path / "d", progress=False)
