"""The fault matrix: `histcode tile`, `pretrain`, `embed` and `heads` killed with SIGKILL at their most awkward
point, then rerun. Afterwards the catalog, the Lance tables and the MLflow registry hold exactly what an
uninterrupted run leaves (rows and ids compared), nothing twice, no run RUNNING, and training resumed from its
checkpoint.

The kill comes from inside the process at a named fail point (``HISTCODE_FAILPOINT``, see
``histcode.runtime.failpoint``), so it always lands at the same place: after a commit to one store and before
the next."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from histcode.features.read import tile_features
from histcode.features.registry import load_view
from histcode.store.catalog import Catalog
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, connect
from histcode.tracking import Tracker
from histcode.workspace import Workspace
from tests.conftest import TINY_HEADS, TINY_PRETRAIN, runs_left_running

pytestmark = pytest.mark.integration
KILLED = -9


def histcode(ws: Workspace, *args: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("HISTCODE_FAILPOINT", None)
    if failpoint:
        env["HISTCODE_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "histcode", "--workspace", str(ws.root), *args], env=env,
                          capture_output=True, text=True, timeout=900)


def _client(ws: Workspace) -> MlflowClient:
    return MlflowClient(tracking_uri=ws.mlflow_uri, registry_uri=ws.mlflow_uri)


def _rows(ws: Workspace, sql: str) -> list[tuple]:
    return [tuple(r.values()) for r in Catalog.of(ws).query(sql)]


def test_tiling_killed_after_a_slide_then_rerun(tiny_cohort, tiled_catalog, tmp_path) -> None:
    ws = Workspace(tmp_path / "ws").ensure()
    assert histcode(ws, "ingest", "--manifest", str(tiny_cohort.manifest)).returncode == 0
    killed = histcode(ws, "tile", failpoint="tiling.committed")
    assert killed.returncode == KILLED, killed.stdout[-2000:]
    assert len(_rows(ws, "SELECT slide_id FROM tilings")) == 1  # one slide was committed, the rest was not
    assert histcode(ws, "tile").returncode == 0
    reference = Catalog(tiled_catalog)  # the same cohort tiled without interruption
    query = "SELECT tile_id, slide_id, x, y, size FROM tiles ORDER BY tile_id"
    assert _rows(ws, query) == [tuple(r.values()) for r in reference.query(query)]
    assert _rows(ws, "SELECT count(*) - count(DISTINCT tile_id) FROM tiles") == [(0,)]
    ledger = "SELECT slide_id, status, n_tiles FROM tilings ORDER BY slide_id"
    assert _rows(ws, ledger) == [tuple(r.values()) for r in reference.query(ledger)]


def _pretrain_params(ws: Workspace) -> None:
    pretrain = {**TINY_PRETRAIN, "max_steps": 6, "checkpoint_every": 2, "num_workers": 0}
    (ws.root / "params.yaml").write_text(yaml.safe_dump({"pretrain": pretrain}))


def _fresh(tiled_catalog: Path, root: Path) -> Workspace:
    ws = Workspace(root).ensure()
    shutil.copy2(tiled_catalog, ws.catalog_path)
    _pretrain_params(ws)
    return ws


def test_pretraining_killed_after_a_checkpoint_resumes_the_same_run(tiled_catalog, tmp_path) -> None:
    ws = _fresh(tiled_catalog, tmp_path / "ws")
    killed = histcode(ws, "pretrain", failpoint="pretrain.checkpoint")
    assert killed.returncode == KILLED
    assert len(runs_left_running(ws)) == 1  # the kill left it RUNNING; the next process ends or continues it
    resumed = histcode(ws, "pretrain", "--resume")
    assert resumed.returncode == 0 and "resumed at step 2" in resumed.stdout, resumed.stdout[-2000:]
    client = _client(ws)
    runs = client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]  # the killed run was continued, not duplicated
    assert [str(v.version) for v in client.search_model_versions("name = 'histcode-encoder'")] == ["1"]
    assert runs_left_running(ws) == []
    reference = _fresh(tiled_catalog, tmp_path / "reference")
    assert histcode(reference, "pretrain").returncode == 0
    a = Tracker(ws).load_model("models:/histcode-encoder@adco")
    b = Tracker(reference).load_model("models:/histcode-encoder@adco")
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x))  # the resumed run ends where the uninterrupted one ends


def test_embedding_killed_between_the_vector_commit_and_the_ledger_then_rerun(embedded_workspace, copy_workspace) -> None:
    ws = copy_workspace(embedded_workspace)
    params = {"pretrain": TINY_PRETRAIN, "features": {"batch_size": 4, "commit_every_slides": 1}}
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
    view = load_view(Catalog.of(ws), None)
    expected = tile_features(ws, view, fmt="pandas").sort_values("tile_id").reset_index(drop=True)
    db = connect(ws.lancedb_uri)
    for kind in (TILE_KIND, SLIDE_KIND):
        db.drop_table(view.table(kind).name)
    with Catalog.of(ws).transaction() as con:
        con.execute("DELETE FROM materializations")
    killed = histcode(ws, "embed", failpoint="embed.committed")
    assert killed.returncode == KILLED
    partial = tile_features(ws, view, fmt="pandas")
    assert 0 < len(partial) < len(expected) and _rows(ws, "SELECT count(*) FROM materializations") == [(0,)]
    assert histcode(ws, "embed").returncode == 0
    tiles = tile_features(ws, view, fmt="pandas").sort_values("tile_id").reset_index(drop=True)
    assert list(tiles.tile_id) == list(expected.tile_id)  # none twice, none missing
    torch.testing.assert_close(torch.from_numpy(np.stack(tiles.vector)), torch.from_numpy(np.stack(expected.vector)))
    ledger = _rows(ws, "SELECT status, sum(rows) FROM materializations GROUP BY 1")
    assert ledger == [("ok", len(expected))]


def _heads_copy(headed_workspace: Workspace, root: Path) -> Workspace:
    """The headed workspace with new heads settings, so nothing of its earlier heads runs is reusable."""
    shutil.copytree(headed_workspace.root, root)
    ws = Workspace(root)
    params = yaml.safe_load(ws.params_path.read_text())
    params["heads"] = {**TINY_HEADS, "seed": 3, "epochs": 6, "tasks": ["tumor"]}
    ws.params_path.write_text(yaml.safe_dump(params))
    return ws


def _registry(ws: Workspace) -> dict:
    client = _client(ws)
    versions = client.search_model_versions("name = 'histcode-tumor-head'")
    fingerprints = {r.info.run_id: r.data.tags.get("histcode.fingerprint") for r in client.search_runs(
        [client.get_experiment_by_name("heads").experiment_id], "tags.`histcode.fingerprint` != ''")}
    model = client.get_registered_model("histcode-tumor-head")
    return {"versions": sorted((int(v.version), v.tags.get("aggregator"), fingerprints.get(v.run_id)) for v in versions),
            "aliases": dict(sorted(model.aliases.items()))}


HEADS_ARGS = ("heads", "--task", "tumor", "--aggregator", "attention", "--aggregator", "mean")


@pytest.fixture(scope="module")
def heads_reference(headed_workspace, tmp_path_factory) -> Workspace:
    """The heads trained without interruption."""
    reference = _heads_copy(headed_workspace, tmp_path_factory.mktemp("heads_reference") / "ws")
    assert histcode(reference, *HEADS_ARGS).returncode == 0
    return reference


@pytest.mark.parametrize("point", ["heads.cv_logged", "heads.registered"])
def test_heads_killed_mid_registration_then_rerun(headed_workspace, heads_reference, tmp_path, point) -> None:
    args, reference = HEADS_ARGS, heads_reference
    ws = _heads_copy(headed_workspace, tmp_path / "ws")
    started = time.time() * 1000
    killed = histcode(ws, *args, failpoint=point)
    assert killed.returncode == KILLED
    rerun = histcode(ws, *args)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert _registry(ws) == _registry(reference)  # the same versions, aggregators, fingerprints and aliases
    client = _client(ws)
    parents = client.search_runs([client.get_experiment_by_name("heads").experiment_id],
                                 "tags.`histcode.task` = 'tumor' and tags.`histcode.aggregator` = 'attention'")
    new = [r for r in parents if r.info.start_time >= started]
    assert len(new) == 1 and new[0].info.status == "FINISHED"  # the interrupted run was resumed, not trained twice
    summary = lambda w: {k: (v["version"], v.get("auc")) for k, v in yaml.safe_load((w.metrics_dir / "heads.json").read_text())["runs"].items()}  # noqa: E731
    assert summary(ws) == summary(reference)
    assert runs_left_running(ws) == []
