"""Patient-level predictions: the pooling rules on hand-worked patients, the out-of-fold patient rows of a real
headed workspace against the slides' rows, patient-level metrics, `histcode sql` and the Python API."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from histcode.heads.outputs import NOT_APPLICABLE, Output
from histcode.heads.patients import merged_bag_arrays, pool_outputs, slides_for_task


def test_tumour_is_any_slide_and_tumour_tasks_pool_the_tumour_slides() -> None:
    p = {"a": 0.2, "b": 0.9, "c": 0.6}
    # the tumour task takes the maximum over every slide, whatever the pooling asked for
    tumour = pool_outputs("tumor", {s: [Output("p_tumor", v, "x")] for s, v in p.items()}, "mean", p)
    assert tumour == [Output("p_tumor", 0.9, "tumor")]
    assert slides_for_task("subtype", ["a", "b", "c"], p) == ["b", "c"]
    assert slides_for_task("tumor", ["c", "a", "b"], p) == ["a", "b", "c"]
    # no slide called tumour: all of them
    assert slides_for_task("de", ["a", "b"], {"a": 0.1, "b": 0.3}) == ["a", "b"]
    # subtype on b and c: p_luad (0.7 + 0.2) / 2 = 0.45 < p_lusc 0.55, so the patient is LUSC
    per_slide = {"b": [Output("p_luad", 0.7, "LUAD"), Output("p_lusc", 0.3, "LUAD")],
                 "c": [Output("p_luad", 0.2, "LUSC"), Output("p_lusc", 0.8, "LUSC")]}
    mean = pool_outputs("subtype", per_slide, "mean", p)
    assert [(o.name, round(o.value, 6), o.call) for o in mean] == [("p_luad", 0.45, "LUSC"), ("p_lusc", 0.55, "LUSC")]
    # by the maximum: p_luad 0.7 < p_lusc 0.8: LUSC again, with the maxima as values
    most = pool_outputs("subtype", per_slide, "max", p)
    assert [(o.name, o.value, o.call) for o in most] == [("p_luad", 0.7, "LUSC"), ("p_lusc", 0.8, "LUSC")]
    # `bag` cannot be recomputed from outputs: it pools like the mean
    assert pool_outputs("subtype", per_slide, "bag", p) == mean


def test_de_calls_are_the_commonest_applicable_call() -> None:
    p = {"a": 0.95, "b": 0.7, "c": 0.8}
    per_slide = {"a": [Output("de_EGFR", 1.0, "up")], "b": [Output("de_EGFR", -0.5, "down")],
                 "c": [Output("de_EGFR", 0.5, "down")]}
    [egfr] = pool_outputs("de", per_slide, "mean", p)
    assert egfr.value == pytest.approx((1.0 - 0.5 + 0.5) / 3) and egfr.call == "down"
    # a tie goes to the slide most surely tumour (a: p_tumor 0.95)
    tie = {"a": [Output("de_EGFR", 1.0, "up")], "b": [Output("de_EGFR", -1.0, "down")]}
    assert pool_outputs("de", tie, "mean", p)[0].call == "up"
    # not_applicable (a slide called normal) gives way to the slides where the call applies
    mixed = {"a": [Output("de_EGFR", 0.2, NOT_APPLICABLE)], "b": [Output("de_EGFR", 0.9, "up")]}
    assert pool_outputs("de", mixed, "mean", p)[0].call == "up"


def test_merged_bag_keeps_every_tile_in_order() -> None:
    a, b = np.arange(6, dtype=np.float32).reshape(3, 2), np.full((2, 2), 9, dtype=np.float32)
    merged = merged_bag_arrays([a, np.zeros((0, 2), np.float32), b])
    assert merged.shape == (5, 2) and (merged[:3] == a).all() and (merged[3:] == 9).all()
    with pytest.raises(ValueError, match="empty"):
        merged_bag_arrays([np.zeros((0, 2), np.float32)])


def test_out_of_fold_patient_rows_pool_the_slides_rows(headed_workspace, copy_workspace) -> None:
    import histcode
    from histcode.apps.patient_predictions import patient_cv_metrics, store_patient_predictions
    from histcode.store.catalog import Catalog
    from histcode.store.sql import run_sql

    ws = copy_workspace(headed_workspace)
    catalog = Catalog.of(ws)
    slides = run_sql(ws, "SELECT p.slide_id, s.patient_id, p.task, p.output, p.value, p.version FROM predictions p "
                         "JOIN slides s USING (slide_id) WHERE p.source = 'cv' AND NOT p.stale").to_pandas()
    current = {t: int(v) for t, v in slides.groupby("task").version.first().items()}
    assert store_patient_predictions(catalog, "cv", "mean", current) > 0
    rows = run_sql(ws, "SELECT * FROM current_patient_predictions").to_pandas()
    assert not rows.duplicated(["patient_id", "output"]).any()
    several = slides.groupby("patient_id").slide_id.nunique()
    assert (several > 1).any()  # the heads cohort has patients with 2-3 slides
    for patient in several.index:
        mine = slides[slides.patient_id == patient]
        tumour = mine[mine.output == "p_tumor"].set_index("slide_id").value
        got = rows[(rows.patient_id == patient) & (rows.output == "p_tumor")].iloc[0]
        assert got.value == pytest.approx(tumour.max()) and got.pooling == "max" and got.n_slides == len(tumour)
        luad = mine[mine.output == "p_luad"].set_index("slide_id").value
        if len(luad):
            called = sorted(s for s in luad.index if tumour.get(s, 0) >= 0.5) or sorted(luad.index)
            got = rows[(rows.patient_id == patient) & (rows.output == "p_luad")].iloc[0]
            assert got.value == pytest.approx(luad.loc[called].mean()) and sorted(got.slide_ids) == called
    metrics = patient_cv_metrics(catalog, bootstrap=50)
    assert set(metrics) <= {"tumor", "subtype"} and "subtype" in metrics
    for task, m in metrics.items():
        assert 0.0 <= m["auc"] <= 1.0 and m["auc_low"] <= m["auc"] + 1e-9 and m["auc"] <= m["auc_high"] + 1e-9
        assert m["patients"] >= 2
    api = histcode.open(ws.root)
    frame = api.patient_predictions(task="tumor")
    assert set(frame.patient_id) == set(rows[rows.task == "tumor"].patient_id) and (frame.output == "p_tumor").all()
    assert len(api.patient_predictions(patient_ids=[frame.patient_id.iloc[0]], current=False)) >= 1
    # a newer version of a task: the old rows stay, stale
    store_patient_predictions(catalog, "cv", "mean", {**current, "tumor": current["tumor"] + 100})
    stale = run_sql(ws, "SELECT stale FROM patient_predictions WHERE task = 'tumor'").to_pandas()
    assert stale.stale.all()


def test_a_changed_slide_takes_its_patient_rows_with_it(headed_workspace, copy_workspace) -> None:
    from histcode.apps.patient_predictions import store_patient_predictions
    from histcode.store.catalog import Catalog
    from histcode.store.sql import run_sql

    ws = copy_workspace(headed_workspace)
    catalog = Catalog.of(ws)
    versions = run_sql(ws, "SELECT task, max(version) AS v FROM predictions WHERE NOT stale GROUP BY task").to_pandas()
    store_patient_predictions(catalog, "cv", "mean", dict(versions.itertuples(index=False)))
    rows = pd.DataFrame(catalog.query("SELECT patient_id, slide_ids FROM patient_predictions"))
    slide = rows.slide_ids.iloc[0][0]
    with catalog.transaction() as con:
        catalog._invalidate(con, slide, "test: its pixels changed")
    left = catalog.query("SELECT count(*) AS n FROM patient_predictions WHERE list_contains(slide_ids, ?)", [slide])
    assert left[0]["n"] == 0
