"""Stored predictions: the catalog's ``predictions`` table as `histcode heads` (out of fold) and `histcode predict`
write it, read back through `histcode sql`, the Python API and the viewer; a newer head version makes the older
rows stale and `histcode predict --refresh` recomputes them."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from histcode.cli import app
from histcode.store.sql import run_sql

runner = CliRunner()


def _invoke(ws, *args):
    return runner.invoke(app, ["--workspace", str(ws.root), *map(str, args)], env={"COLUMNS": "250"})


def _sql(ws, query: str) -> pd.DataFrame:
    return run_sql(ws, query).to_pandas()


def _client(ws):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=ws.mlflow_uri, registry_uri=ws.mlflow_uri)


def test_heads_store_every_registered_versions_out_of_fold_predictions(headed_workspace) -> None:
    import histcode

    ws = headed_workspace
    client = _client(ws)
    rows = _sql(ws, "SELECT * FROM predictions WHERE source = 'cv'")
    assert set(rows.task) == {"tumor", "subtype", "de", "survival"}
    api = histcode.open(ws.root)
    folds = dict(_sql(ws, "SELECT slide_id, fold FROM cv_folds").itertuples(index=False))
    for alias in ("attention", "mean"):
        version = int(client.get_model_version_by_alias("histcode-tumor-head", alias).version)
        mine = rows[(rows.task == "tumor") & (rows.version == version)].set_index("slide_id")
        logged = api.cv_predictions("tumor", alias).set_index("slide_id")  # the run's own predictions.csv
        assert set(mine.index) == set(logged.index) and len(mine) == len(logged)
        assert np.allclose(mine.loc[logged.index, "value"], logged.p_tumor, atol=1e-6)
        assert (mine.output == "p_tumor").all() and set(mine.aggregator) == {alias}
        assert all(mine.loc[s, "fold"] == folds[s] for s in mine.index)  # the fold that held the patient out
    # one current row per slide and output, from the version @best names, none stale
    best = {t: int(client.get_model_version_by_alias(f"histcode-{t}-head", "best").version) for t in ("tumor", "de")}
    current = _sql(ws, "SELECT * FROM current_predictions")
    assert not current.duplicated(["slide_id", "output"]).any() and not current.stale.any()
    for task, version in best.items():
        assert set(current[current.task == task].version) == {version}
    for task, version in best.items():  # the other versions' rows are kept, marked stale
        of_task = rows[rows.task == task]
        assert not of_task[of_task.version == version].stale.any() and of_task[of_task.version != version].stale.all()
    # the Python API reads the same rows, long or one row per slide
    mine = api.predictions(task="tumor")
    assert set(mine.slide_id) == set(current[current.task == "tumor"].slide_id) and set(mine.version) == {best["tumor"]}
    wide = api.predictions(wide=True).set_index("slide_id")
    assert wide.index.is_unique and {"p_tumor", "p_luad", "p_lusc"} <= set(wide.columns)
    tumour = current[current.output == "p_tumor"].set_index("slide_id").value
    assert np.allclose(wide.loc[tumour.index, "p_tumor"].astype(float), tumour)
    assert len(api.predictions(current=False)) == len(rows) + len(_sql(ws, "SELECT * FROM predictions WHERE source != 'cv'"))
    with pytest.raises(histcode.UsageError, match="unknown task"):
        api.predictions(task="mutation")
    calls = current[current.task == "de"].call
    assert len(calls) and set(calls) <= {"up", "down", "unchanged", "not_classified"}
    # the patients' out-of-fold rows, pooled from @best's slide rows, and their metrics on each task's best run
    patients = _sql(ws, "SELECT * FROM current_patient_predictions WHERE source = 'cv'")
    slides_of = _sql(ws, "SELECT DISTINCT s.patient_id FROM predictions p JOIN slides s USING (slide_id) "
                         "WHERE p.source = 'cv' AND p.task = 'tumor'")
    assert set(patients[patients.task == "tumor"].patient_id) == set(slides_of.patient_id)
    assert set(patients[patients.task == "tumor"].version) == {best["tumor"]}
    summary = json.loads((ws.metrics_dir / "heads.json").read_text())
    # (every patient of the heads cohort has a tumour slide: patient-level tumour has one class and no AUC)
    assert "subtype" in summary["patients"] and set(summary["patients"]) <= {"tumor", "subtype"}
    run = client.get_run(summary["runs"]["subtype/best"]["run_id"])
    assert run.data.metrics["patient_auc"] == pytest.approx(summary["patients"]["subtype"]["auc"], abs=1e-4)


def test_predict_stores_rows_a_newer_head_makes_them_stale_and_refresh_recomputes(
        headed_workspace, other_cohort, copy_workspace, tmp_path) -> None:
    from histcode.viewer import create_app
    from histcode.viewer.serving import background_server

    ws = copy_workspace(headed_workspace)
    out = tmp_path / "preds.csv"
    done = _invoke(ws, "predict", "--manifest", other_cohort.manifest, "--out", out, "--patients",
                   tmp_path / "patients.csv")
    assert done.exit_code == 0, done.output
    csv = pd.read_csv(out, dtype={"slide_id": str}).set_index("slide_id")
    stored = _sql(ws, "SELECT slide_id, value, version, in_distribution, ood_score FROM current_predictions "
                      "WHERE source = 'predict' AND output = 'p_tumor'").set_index("slide_id")
    assert set(stored.index) == set(csv.index) and len(csv) > 0
    assert np.allclose(stored.loc[csv.index, "value"], csv.p_tumor, atol=1e-9)
    assert np.allclose(stored.loc[csv.index, "ood_score"], csv.ood_score, atol=1e-9)
    old = int(stored.version.iloc[0])
    # the predicted slides' patients, pooled: in the catalog and the --patients CSV
    patients = pd.read_csv(tmp_path / "patients.csv", dtype={"patient_id": str})
    owners = _sql(ws, "SELECT slide_id, patient_id FROM slides").set_index("slide_id").patient_id
    assert set(patients.patient_id) == set(owners.loc[csv.index]) and set(patients.source) == {"predict"}
    tumour = patients[patients.output == "p_tumor"].set_index("patient_id")
    for patient, row in tumour.iterrows():  # a patient has tumour when any slide has: the maximum
        assert row.value == pytest.approx(csv.loc[owners[owners == patient].index.intersection(csv.index), "p_tumor"].max())
    assert "patients predicted" in done.output
    # `bag` pooling: one patient's two slides as one bag through the subtype head, stored as that patient's row
    from histcode.apps.heatmaps import slide_bag
    from histcode.apps.patient_predictions import bag_outputs, store_patient_predictions
    from histcode.apps.predict import current_versions, registered_heads
    from histcode.store.catalog import Catalog
    from histcode.tracking import Tracker

    heads = registered_heads(Tracker(ws))
    patient = next(p for p in sorted(set(owners.loc[csv.index])) if (owners.loc[csv.index] == p).sum() == 2)
    pair = sorted(s for s in csv.index if owners[s] == patient)
    head = heads["subtype"]
    bags = {head.view_id: {s: slide_bag(ws, head, s) for s in pair}}
    merged = bag_outputs(heads, bags, pair, "subtype", None)
    alone = head(np.concatenate([bags[head.view_id][s].features for s in pair]))[0]
    assert [o.value for o in merged] == pytest.approx([float(v) for v in np.asarray(alone).ravel()], abs=1e-6)
    store_patient_predictions(Catalog.of(ws), "predict", "bag", current_versions(heads), [patient],
                              {(patient, "subtype"): merged})
    row = _sql(ws, f"SELECT * FROM current_patient_predictions WHERE patient_id = '{patient}' AND task = 'subtype' "
                   "AND source = 'predict' ORDER BY output")
    assert set(row.pooling) == {"bag"} and row.value.tolist() == pytest.approx([o.value for o in merged])

    # another registered version becomes tumor@best: the rows of the old one are stale
    client = _client(ws)
    other = int(client.get_model_version_by_alias("histcode-tumor-head", "mean").version)
    assert other != old
    client.set_registered_model_alias("histcode-tumor-head", "best", str(other))
    refreshed = _invoke(ws, "predict", "--refresh", "--out", tmp_path / "refreshed.csv")
    assert refreshed.exit_code == 0, refreshed.output
    again = pd.read_csv(tmp_path / "refreshed.csv", dtype={"slide_id": str})
    assert set(again.slide_id) >= set(csv.index)
    rows = _sql(ws, "SELECT slide_id, version, stale FROM predictions WHERE source = 'predict' AND task = 'tumor'")
    assert rows[rows.version == old].stale.all() and not rows[rows.version == other].stale.any()
    assert set(rows[rows.version == other].slide_id) >= set(csv.index)
    current = _sql(ws, "SELECT slide_id, version FROM current_predictions WHERE task = 'tumor'")
    assert set(current.version) == {other}  # training slides: the new version's out-of-fold rows, fresh again
    nothing = _invoke(ws, "predict", "--refresh")
    assert nothing.exit_code == 0 and "nothing to refresh" in nothing.output
    assert _invoke(ws, "predict", "--refresh", "--slide", "no-such-slide").exit_code == 2

    # the viewer reads what is stored: a predicted slide shows its rows, one without any says how to make them
    sid = csv.index[0]
    with background_server(create_app(ws, cache_dir=tmp_path / "cache")) as url:
        info = _get(f"{url}/api/slide?" + urllib.parse.urlencode({"id": sid}))
        assert info["predictions"]["values"]["p_tumor"] == pytest.approx(again.set_index("slide_id").p_tumor[sid])
        assert [b["version"] for b in info["predictions"]["by"] if b["task"] == "tumor"] == [other]
        assert info["predictions"]["note"] is None
        owner = owners[sid]
        assert info["patient"]["patient_id"] == owner and info["patient"]["values"]["p_tumor"] is not None
        assert {b["task"] for b in info["patient"]["by"]} >= {"tumor"}
        from histcode.store.catalog import Catalog

        with Catalog.of(ws).transaction() as con:  # as if the slide had been registered and never predicted
            con.execute("DELETE FROM predictions WHERE slide_id = ?", [sid])
        info = _get(f"{url}/api/slide?" + urllib.parse.urlencode({"id": sid}))
        assert info["predictions"]["values"] == {}
        assert info["predictions"]["note"].endswith(f"histcode predict --refresh --slide {sid}")
    third = _invoke(ws, "predict", "--refresh", "--out", tmp_path / "third.csv")
    assert third.exit_code == 0, third.output
    assert list(pd.read_csv(tmp_path / "third.csv", dtype={"slide_id": str}).slide_id) == [sid]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def test_a_slide_whose_pixels_change_loses_its_stored_predictions(tmp_path) -> None:
    from histcode.store.catalog import Catalog
    from histcode.store.predictions import stale_slides, write_predictions
    from histcode.store.records import SlideRecord

    catalog = Catalog(tmp_path / "catalog.duckdb")
    catalog.put_cohort("new", "inference")
    for sid, digest in (("a", "h1"), ("b", "h2")):
        catalog.put_slide(SlideRecord(sid, f"/x/{sid}.svs", "ok", content_hash=digest, mpp_x=0.5, mpp_y=0.5,
                                      cohort="new"))
    frame = pd.DataFrame([{"slide_id": s, "task": "tumor", "model": "histcode-tumor-head", "version": 1,
                           "source": "predict", "output": "p_tumor", "value": 0.5} for s in ("a", "b")])
    assert write_predictions(catalog, frame, {"tumor": 1}) == 2
    assert write_predictions(catalog, frame, {"tumor": 1}) == 2  # a rerun replaces, never duplicates
    assert catalog.query("SELECT count(*) AS n FROM predictions")[0]["n"] == 2
    assert stale_slides(catalog) == []
    catalog.put_slide(SlideRecord("a", "/x/a.svs", "ok", content_hash="h3", mpp_x=0.5, mpp_y=0.5, cohort="new"))
    assert [r["slide_id"] for r in catalog.query("SELECT slide_id FROM predictions")] == ["b"]
    assert stale_slides(catalog) == ["a"]  # an inference slide without predictions is what --refresh makes
    write_predictions(catalog, pd.DataFrame(), {"tumor": 2})
    assert stale_slides(catalog) == ["a", "b"]
