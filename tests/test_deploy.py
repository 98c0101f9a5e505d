"""Orchestration for real: a Prefect server on a free 127.0.0.1 port, the prefect.yaml deployments, a process
worker running the whole pipeline on the tiny cohort, and the per-slide fan-out on a 2-worker Dask LocalCluster."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from histcode.store.catalog import Catalog
from histcode.workspace import Workspace
from tests.conftest import TINY_DEMO, TINY_HEADS, TINY_PRETRAIN

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    from flows.serve import prefect_server

    root = tmp_path_factory.mktemp("prefect")
    with prefect_server(home=root / "home", log_file=root / "server.log") as api_url:
        yield api_url, root / "home"


@pytest.fixture
def api_env(prefect_api, monkeypatch):
    """Point this process (and the processes it starts) at the test server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api_url, home = prefect_api
    monkeypatch.setenv("PREFECT_API_URL", api_url)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    with temporary_settings({PREFECT_API_URL: api_url}):
        yield api_url, home


def _tiny_workspace(root) -> Workspace:
    ws = Workspace(root).ensure()
    params = {"demo": TINY_DEMO.model_dump(mode="json"), "pretrain": TINY_PRETRAIN,
              "labels": {"min_class_size": 1, "folds": 2}, "heads": {**TINY_HEADS, "epochs": 5, "bootstrap": 20}}
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
    return ws


def test_pipeline_deployment_runs_on_a_process_worker(api_env, tmp_path) -> None:
    from prefect.deployments import run_deployment

    from flows.serve import deploy, worker

    api_url, home = api_env
    ws = _tiny_workspace(tmp_path / "ws")
    deploy(api_url, home)
    with worker(api_url, home, log_file=tmp_path / "worker.log"):
        run = run_deployment("histcode-pipeline/demo", parameters={"workspace": str(ws.root)}, timeout=900)
    log = (tmp_path / "worker.log").read_text() if (tmp_path / "worker.log").exists() else ""
    assert run.state.is_completed(), f"{run.state}\n{log[-4000:]}"
    heads = json.loads((ws.metrics_dir / "heads.json").read_text())
    assert set(heads["best"]) - {"survival"} == {"tumor", "subtype", "de"}
    slides = Catalog.of(ws).slides(status="ok")
    assert len(slides) == json.loads((ws.metrics_dir / "tiling.json").read_text())["slides_tiled_ok"] > 0
    assert list((ws.outputs_dir / "heatmaps").glob("*.png"))


def test_ingest_fans_out_on_a_two_worker_dask_cluster(api_env, tiny_cohort, tiled_catalog, tmp_path) -> None:
    from prefect_dask import DaskTaskRunner

    from flows.ingest import ingest_flow

    ws = Workspace(tmp_path / "ws").ensure()
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True})
    summary = ingest_flow.with_options(task_runner=runner)(manifest=str(tiny_cohort.manifest), workspace=str(ws.root))
    assert summary["ingest"]["failed"] == 0 and summary["tiling"]["failed"] == 0
    # the same tiles as the default thread runner gave (tiled_catalog)
    reference = shutil.copy2(tiled_catalog, tmp_path / "reference.duckdb")
    ids = lambda path: sorted(Catalog(path).tiles().column("tile_id").to_pylist())  # noqa: E731
    assert ids(ws.catalog_path) == ids(reference)


def test_materialisation_fans_out_on_a_two_worker_dask_cluster_with_the_rows_of_one(api_env, embedded_workspace,
                                                                                   copy_workspace) -> None:
    """The feature view embedded again by the flow, sharded over a 2-worker Dask LocalCluster: exactly the rows
    the one-process materialisation wrote (tile ids, coordinates, vectors), the ledger written by the flow,
    the staging folders gone, and a rerun that embeds nothing."""
    import numpy as np

    from flows.embed import embed_flow
    from histcode.features.read import slide_features, tile_features

    ws = copy_workspace(embedded_workspace)
    before = tile_features(ws, fmt="pandas").sort_values("tile_id").reset_index(drop=True)
    slides_before = slide_features(ws, fmt="pandas").sort_values("slide_id").reset_index(drop=True)
    shutil.rmtree(ws.root / "data" / "lancedb")  # the vectors and the ledger gone: every slide is embedded again
    with Catalog.of(ws).transaction() as con:
        con.execute("DELETE FROM materializations")
    summary = embed_flow(workspace=str(ws.root), workers=2)
    assert summary["workers"] == 2 and summary["failed"] == 0 and summary["tiles_embedded"] == len(before)
    after = tile_features(ws, fmt="pandas").sort_values("tile_id").reset_index(drop=True)
    assert after.drop(columns="vector").equals(before.drop(columns="vector"))
    assert np.array_equal(np.stack(after.vector), np.stack(before.vector))
    slides_after = slide_features(ws, fmt="pandas").sort_values("slide_id").reset_index(drop=True)
    assert np.array_equal(np.stack(slides_after.vector), np.stack(slides_before.vector))
    ledger = Catalog.of(ws).query("SELECT slide_id, status, rows FROM materializations ORDER BY slide_id")
    assert len(ledger) == len(slides_before) and {r["status"] for r in ledger} == {"ok"}
    assert not list((ws.outputs_dir / "staging").glob("*/*"))
    again = embed_flow(workspace=str(ws.root), workers=2)
    assert again["slides_embedded"] == 0 and again["slides_skipped"] == len(slides_before)


def _git(args: list[str], cwd) -> str:
    import subprocess

    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_dvc_repro_after_the_demo_does_no_work_then_runs_an_experiment(tmp_path) -> None:
    """`histcode demo` in a temporary git copy of the repository, on the tiny configuration, then `dvc repro` of
    dvc.yaml: every stage runs its command, and none trains, embeds or registers anything (one notion of done);
    an unchanged `dvc repro` has nothing to do; `dvc exp run -S pretrain.method=moco` trains a second encoder."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow import MlflowClient

    repo = Path(__file__).resolve().parent.parent
    copy = tmp_path / "repo"
    for rel in _git(["ls-files"], repo).splitlines():
        if rel.startswith("tests/"):
            continue
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, copy / rel)
    ws = _tiny_workspace(copy)
    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    full = yaml.safe_load((repo / "params.yaml").read_text())  # dvc.yaml names keys: keep every one
    (ws.root / "params.yaml").write_text(yaml.safe_dump({k: {**v, **params.get(k, {})} for k, v in full.items()}))
    _git(["init", "-q"], copy)
    _git(["-c", "user.email=t@example.org", "-c", "user.name=test", "commit", "-qm", "copy", "--allow-empty"], copy)
    _git(["add", "-A"], copy)
    _git(["-c", "user.email=t@example.org", "-c", "user.name=test", "commit", "-qm", "tiny"], copy)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]

    def run(*args: str) -> str:
        done = subprocess.run([*dvc, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    demo = subprocess.run([sys.executable, "-m", "histcode", "--workspace", str(copy), "demo", "--workers", "1"],
                          cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    client = MlflowClient(tracking_uri=ws.mlflow_uri, registry_uri=ws.mlflow_uri)

    def recorded() -> tuple[dict, list]:
        runs = {e.name: sorted(r.info.run_id for r in client.search_runs([e.experiment_id]))
                for e in client.search_experiments()}
        versions = sorted((m.name, m.version) for m in client.search_model_versions())
        return runs, versions

    before = recorded()
    demo_heads = json.loads((copy / "metrics" / "heads.json").read_text())
    run("repro")
    assert recorded() == before, "dvc repro after the demo trained or registered something"
    assert json.loads((copy / "metrics" / "embed.json").read_text())["slides_embedded"] == 0
    heads = json.loads((copy / "metrics" / "heads.json").read_text())
    run_ids = lambda h: {k: v["run_id"] for k, v in h["runs"].items()}  # noqa: E731 -- the same runs, read back
    assert run_ids(heads) == run_ids(demo_heads) and (copy / "dvc.lock").is_file()
    assert set(heads["best"]) - {"survival"} == {"tumor", "subtype", "de"}
    assert "heads" in run("metrics", "show") and list((copy / "metrics" / "plots" / "roc").glob("*.csv"))
    assert "up to date" in run("repro").lower() or "didn't change" in run("status").lower()
    _git(["add", "-A"], copy)
    _git(["-c", "user.email=t@example.org", "-c", "user.name=test", "commit", "-qm", "repro"], copy)
    run("exp", "run", "-S", "pretrain.method=moco")
    assert json.loads((copy / "metrics" / "pretrain.json").read_text())["method"] == "moco"


def test_histcode_serve_deploys_and_stops_cleanly(tmp_path) -> None:
    """The documented command: server, pool, deployments and worker come up; SIGTERM takes all of them down."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from flows.serve import free_port, wait_healthy

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": api}
    histcode = str(Path(sys.executable).parent / "histcode")
    with open(tmp_path / "serve.log", "wb") as out:
        process = subprocess.Popen([histcode, "--workspace", str(tmp_path / "ws"), "serve", "--port", str(port)], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_healthy(api, timeout=120)
            wanted = {"demo", "cohort", "ingest", "pretrain", "embed", "labels", "heads"}
            names, deadline = set(), time.monotonic() + 180
            while not wanted <= names and time.monotonic() < deadline:
                request = urllib.request.Request(f"{api}/deployments/filter", data=b"{}", method="POST",
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    names = {d["name"] for d in json.loads(response.read())}
                time.sleep(1)
            assert wanted <= names, names
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    logs = tmp_path / "ws" / "outputs" / "logs"  # the workspace's, and said so on start
    assert str(logs) in (tmp_path / "serve.log").read_text()
    assert (logs / "prefect-server.log").stat().st_size > 0 and (logs / "prefect-worker.log").is_file()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server's port is released: nothing was left running
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the Prefect server on port {port} is still running after SIGTERM")


def test_mlflow_ui_serves_the_workspace_store(embedded_workspace, copy_workspace, tmp_path) -> None:
    """`histcode --workspace W mlflow-ui`: the UI over W's store, with links that open on the training runs."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from flows.serve import free_port

    ws = copy_workspace(embedded_workspace)
    port = free_port()
    histcode = str(Path(sys.executable).parent / "histcode")
    with open(tmp_path / "ui.log", "wb") as out:
        process = subprocess.Popen([histcode, "--workspace", str(ws.root), "mlflow-ui", "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
        try:
            names, deadline = set(), time.monotonic() + 120
            while not names and time.monotonic() < deadline:
                try:
                    request = urllib.request.Request(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search",
                                                     data=b'{"max_results": 100}', method="POST",
                                                     headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(request, timeout=5) as response:
                        names = {e["name"] for e in json.loads(response.read())["experiments"]}
                except OSError:
                    time.sleep(0.5)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    log = (tmp_path / "ui.log").read_text()
    assert "pretrain" in names, log[-3000:]
    assert f"http://127.0.0.1:{port}/#/experiments/" in log and "workflowType=machine_learning" in log
