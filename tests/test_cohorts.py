"""Cohorts keep predicted slides apart from training: `histcode predict` registers new slides in an inference
cohort, and pretraining, labels, folds and heads read the training cohorts only."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

from histcode.apps.predict import predict_slides
from histcode.apps.train_heads import train_heads
from histcode.features.registry import training_state
from histcode.features.registry import load_view
from histcode.ingest.sources import read_manifest, sources_from_paths
from histcode.labels.run import ingest_labels
from histcode.ssl.dataset import dataset_from_catalog
from histcode.ssl.pretrain import pretraining_data
from histcode.store.catalog import Catalog, CatalogError
from histcode.tiling.spec import spec_id_of
from tests.conftest import runs_left_running


def _renamed_manifest(cohort, tmp_path, prefix: str = "TCGA-ZZ") -> tuple:
    """The other cohort's slides under new TCGA barcodes (patients TCGA-ZZ-...), and the renaming."""
    rows = list(csv.DictReader(cohort.manifest.open()))
    rename = {r["slide_id"]: r["slide_id"].replace("TCGA-HC", prefix) for r in rows}
    out = tmp_path / "new_slides.csv"
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["path", "slide_id", "subtype"])
        writer.writeheader()
        for r in rows:
            writer.writerow({"path": str(cohort.out_dir / r["path"]), "slide_id": rename[r["slide_id"]],
                             "subtype": r["subtype"]})
    return out, rename


@pytest.mark.integration
def test_predicted_slides_never_reach_pretraining_labels_folds_or_heads(headed_workspace, copy_workspace,
                                                                        other_cohort, heads_cohort, tmp_path) -> None:
    ws = copy_workspace(headed_workspace)
    cfg = ws.config()
    manifest, rename = _renamed_manifest(other_cohort, tmp_path)
    new_ids = set(rename.values())
    result = predict_slides(ws, cfg, read_manifest(manifest), progress=False)
    preds = result.predictions.set_index("slide_id")
    assert set(preds.index) == new_ids and (preds.status == "ok").all(), preds[["status", "reason"]]
    assert (preds.cohort == "inference").all()
    catalog = Catalog.of(ws)
    assert catalog.cohorts() == {"default": "training", "inference": "inference"}
    assert catalog.training_cohorts() == ["default"]
    spec = spec_id_of(cfg.tiling)
    predicted_tiles = set(catalog.tiles(spec_id=spec).to_pandas().query("slide_id in @new_ids").tile_id)
    assert predicted_tiles  # they were tiled and embedded like any slide

    # pretraining reads the training cohort only
    data = pretraining_data(catalog, cfg)
    assert data.cohorts == ["default"] and not new_ids & set(data.slide_ids)
    assert not predicted_tiles & set(dataset_from_catalog(catalog, spec, 32, data.slide_ids).tile_ids)

    # labels and folds: even with the predicted patients' RNA in the matrix, they are not labelled
    expression = pd.read_csv(heads_cohort.out_dir / "expression.tsv", sep="\t", index_col=0)
    theirs = pd.read_csv(other_cohort.out_dir / "expression.tsv", sep="\t", index_col=0)
    theirs.columns = [c.replace("TCGA-HC", "TCGA-ZZ") for c in theirs.columns]
    both = tmp_path / "expression.tsv"
    pd.concat([expression, theirs], axis=1).to_csv(both, sep="\t")
    labels = ingest_labels(ws, cfg, both)
    assert labels.cohorts == ["default"]
    for table in ("slide_labels", "cv_folds", "de_labels"):
        ids = {r["slide_id"] for r in catalog.query(f"SELECT slide_id FROM {table}")}
        assert ids and not ids & new_ids, table
    unmapped = catalog.query("SELECT sample_id, problem FROM expression_samples WHERE sample_id LIKE 'TCGA-ZZ%'")
    assert unmapped and all(r["problem"] for r in unmapped)

    # (the gate refuses that matrix: its predicted patients' samples map to no training slide)
    from histcode.labels.run import gate_labels

    assert not gate_labels(ws, cfg).passed
    ingest_labels(ws, cfg, heads_cohort.out_dir / "expression.tsv")
    assert gate_labels(ws, cfg).passed
    # heads: the view holds the predicted vectors, the heads' bags and folds do not
    view = load_view(catalog, None)
    assert not {s for s, _, _ in training_state(catalog, view, ["default"])} & new_ids
    report = train_heads(ws, cfg, ("tumor",), ("mean",), force=True)
    cv = next(r for r in report.results if r.aggregator == "mean")  # beside it: the selection's own run
    seen = {s for fold in cv.fold_slides for part in fold.values() for s in part}
    assert seen and not seen & new_ids and report.cohorts == ["default"]
    assert runs_left_running(ws) == []


@pytest.mark.integration
def test_prediction_keeps_training_slides_where_they_are_and_refuses_what_would_mix(
        headed_workspace, copy_workspace, other_cohort) -> None:
    ws = copy_workspace(headed_workspace)
    cfg = ws.config()
    catalog = Catalog.of(ws)
    training = catalog.slides(status="ok")[0]
    before = catalog.get_slide(training["slide_id"])
    # a training slide predicted by its own id and file: predicted where it is, nothing moves
    (same,) = sources_from_paths([Path(training["path"])], cfg.ingest.extensions)
    # another file under a training slide's id, and a training slide's pixels under a new id
    other_file = next(other_cohort.out_dir.glob("slides/*.svs"))
    clash = type(same)(path=other_file, slide_id=training["slide_id"], patient_id=training["patient_id"])
    twin = type(same)(path=same.path, slide_id="copy-of-a-training-slide", patient_id="someone")
    preds = predict_slides(ws, cfg, [same, twin], progress=False).predictions
    assert list(preds.status) == ["ok", "failed"] and preds.cohort.iloc[0] == "default"
    assert "same pixels" in preds.reason.iloc[1] and training["slide_id"] in preds.reason.iloc[1]
    preds = predict_slides(ws, cfg, [clash], progress=False).predictions
    assert list(preds.status) == ["failed"]
    assert "already names a slide of cohort 'default'" in preds.reason.iloc[0]
    after = catalog.get_slide(training["slide_id"])
    assert (after["cohort"], after["content_hash"], after["path"]) == (before["cohort"], before["content_hash"], before["path"])
    # an inference cohort cannot be named for training, nor a training cohort for prediction
    with pytest.raises(CatalogError, match="training cohort"):
        predict_slides(ws, cfg, [same], progress=False, cohort="default")
    strict = cfg.model_copy(update={"cohorts": cfg.cohorts.model_copy(update={"train": ("inference",)})})
    with pytest.raises(CatalogError, match="inference cohorts"):
        pretraining_data(catalog, strict)
    assert runs_left_running(ws) == []


def test_slides_move_between_cohorts_and_training_follows(tiled_workspace) -> None:
    from typer.testing import CliRunner

    from histcode.cli import app

    ws, cfg = tiled_workspace, tiled_workspace.config()
    catalog = Catalog.of(ws)
    first = catalog.slides(status="ok")[0]["slide_id"]
    runner = CliRunner()
    out = runner.invoke(app, ["--workspace", str(ws.root), "cohorts", "move", first, "--to", "held-out", "--role", "inference"])
    assert out.exit_code == 0, out.output
    assert catalog.cohorts()["held-out"] == "inference"
    assert first not in pretraining_data(catalog, cfg).slide_ids
    listed = runner.invoke(app, ["--workspace", str(ws.root), "cohorts", "list", "--format", "csv"]).stdout
    assert "held-out,inference,1,1" in listed
    out = runner.invoke(app, ["--workspace", str(ws.root), "cohorts", "move", "no-such-slide", "--to", "default"])
    assert out.exit_code == 2 and "no such slides" in out.output
    with pytest.raises(CatalogError, match="inference cohort"):
        catalog.move_slides([first], "held-out", "training")  # a cohort keeps its role
    catalog.move_slides([first], "default")
    assert first in pretraining_data(catalog, cfg).slide_ids
