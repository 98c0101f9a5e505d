"""The shared set-up of a lab, for real: PostgreSQL (the distribution's, a throw-away cluster), an S3 endpoint
(moto's server), `mlflow server` on PostgreSQL with its artifacts on S3 and MLflow workspaces, `prefect server`
on PostgreSQL with the work pool, deployments and a process worker, and a Dask scheduler with two `dask
worker` processes, each a separate process on 127.0.0.1 (``histcode.services.stack``, as `histcode services up`
starts it).

Two users' pipelines run through the Prefect deployment at the same time, with MLflow, LanceDB and artifacts
remote and the tiling and materialisation fanned out over the scheduler, while the embedded default runs the
first user's configuration in a process of its own: the rows, vectors and heads metrics must agree, the users
must not see each other, the CLI must work against the remote stores and no credential may be stored. Then the
faults: a stopped MLflow server, object storage refusing, a Dask worker lost mid-shard, PostgreSQL restarted, and
two writers of one catalog."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from histcode.store.catalog import Catalog
from histcode.workspace import Workspace
from tests.conftest import TINY_DEMO, TINY_HEADS, TINY_PRETRAIN

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
# MLflow's client retries a server that does not answer for minutes by default; a user sets these the same way
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from histcode.services.stack import Stack

    s = Stack(tmp_path_factory.mktemp("stack"), dask_workers=2, repo=REPO)
    try:
        s.up()
        yield s
    finally:
        s.down(remove=True)


def _client_env(stack, **extra) -> dict[str, str]:
    return {**os.environ, **stack.environment(), **FAST_FAIL, **extra}


def _embedded_env(stack) -> dict[str, str]:
    """This machine's environment without the stack: the embedded default (SQLite, local Lance, no server)."""
    drop = set(stack.environment()) | {"PREFECT_API_URL", "PREFECT_HOME"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@contextmanager
def _using(env: dict[str, str]):
    """This test process pointed at the stack for the block (reads of the remote stores from here)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _workspace(root: Path, seed: int) -> Workspace:
    ws = Workspace(root).ensure()
    params = {"demo": {**TINY_DEMO.model_dump(mode="json"), "seed": seed}, "pretrain": TINY_PRETRAIN,
              "labels": {"min_class_size": 1, "folds": 2}, "heads": {**TINY_HEADS, "epochs": 5, "bootstrap": 20}}
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
    return ws


def _histcode(ws: Workspace, *args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "histcode", "-w", str(ws.root), *args], env=env, cwd=ws.root,
                          capture_output=True, text=True, timeout=timeout)


def _deployment_run(api_url: str, ws: Workspace, out: dict) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        out[ws.root.name] = run_deployment("histcode-pipeline/demo", parameters={"workspace": str(ws.root)},
                                           timeout=1500)


@pytest.fixture(scope="module")
def users(stack, tmp_path_factory):
    """alice and bob (two cohorts) through the deployment at once; the embedded run of alice's configuration
    beside them."""
    root = tmp_path_factory.mktemp("users")
    alice, bob, reference = _workspace(root / "alice", 7), _workspace(root / "bob", 11), _workspace(root / "ref", 7)
    log = open(root / "reference.log", "wb")  # noqa: SIM115
    embedded = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--workspace", str(reference.root)],
                                env=_embedded_env(stack), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    runs: dict = {}
    with _using(_client_env(stack)):
        threads = [threading.Thread(target=_deployment_run, args=(stack.urls()["prefect"], ws, runs))
                   for ws in (alice, bob)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    code = embedded.wait(timeout=1500)
    log.close()
    worker_log = (stack.logs / "prefect-worker.log").read_text(errors="replace")[-5000:]
    for name in ("alice", "bob"):
        assert name in runs and runs[name].state.is_completed(), f"{name}: {runs.get(name)}\n{worker_log}"
    assert code == 0, (root / "reference.log").read_text()[-4000:]
    return {"alice": alice, "bob": bob, "reference": reference, "runs": runs}


def _tiles(ws: Workspace):
    return Catalog.of(ws).tiles().to_pandas().sort_values("tile_id").reset_index(drop=True)


def test_the_pipeline_through_the_services_gives_what_the_embedded_run_gives(users, stack) -> None:
    from histcode.features.read import slide_features, tile_features

    alice, reference = users["alice"], users["reference"]
    assert not alice.lancedb_dir.exists() and not (alice.mlruns_dir / "mlflow.db").exists()  # nothing local
    assert (reference.lancedb_dir).is_dir()
    # the same catalog rows
    slides = lambda ws: sorted((s["slide_id"], s["patient_id"], s["content_hash"], s["status"])  # noqa: E731
                               for s in Catalog.of(ws).slides())
    assert slides(alice) == slides(reference)
    assert _tiles(alice).equals(_tiles(reference))
    # the same vectors, bit for bit (alice's from S3 written by two Dask workers, the reference's from disk)
    with _using(_client_env(stack)):
        remote = tile_features(alice, fmt="pandas").sort_values("tile_id").reset_index(drop=True)
        remote_slides = slide_features(alice, fmt="pandas").sort_values("slide_id").reset_index(drop=True)
        assert alice.lancedb_uri.startswith("s3://histcode/lancedb/alice-")
    with _using(_embedded_env(stack)):
        local = tile_features(reference, fmt="pandas").sort_values("tile_id").reset_index(drop=True)
        local_slides = slide_features(reference, fmt="pandas").sort_values("slide_id").reset_index(drop=True)
    assert len(remote) == len(_tiles(alice)) > 0
    assert remote.drop(columns="vector").equals(local.drop(columns="vector"))
    assert np.array_equal(np.stack(remote.vector), np.stack(local.vector))
    assert np.array_equal(np.stack(remote_slides.vector), np.stack(local_slides.vector))
    embed = json.loads((alice.metrics_dir / "embed.json").read_text())
    assert embed["workers"] == 2 and embed["dask_address"] == stack.urls()["dask"]
    # the same heads metrics
    metrics = lambda ws: {k: {m: v for m, v in r.items() if m not in ("run_id", "version")}  # noqa: E731
                          for k, r in json.loads((ws.metrics_dir / "heads.json").read_text())["runs"].items()}
    assert json.dumps(metrics(alice), sort_keys=True) == json.dumps(metrics(reference), sort_keys=True)


def test_two_users_at_once_do_not_see_each_others_runs_models_or_tables(users, stack) -> None:
    import boto3
    from mlflow.exceptions import MlflowException

    from histcode.tracking import Tracker

    alice, bob = users["alice"], users["bob"]
    assert alice.project() != bob.project()
    with _using(_client_env(stack)):
        ta, tb = Tracker(alice), Tracker(bob)
        assert (ta.mlflow_workspace, tb.mlflow_workspace) == (alice.project(), bob.project())
        for mine, other, other_ws in ((ta, tb, bob), (tb, ta, alice)):
            heads = json.loads((other_ws.metrics_dir / "heads.json").read_text())
            for run in heads["runs"].values():
                with pytest.raises(MlflowException):
                    mine.client.get_run(run["run_id"])
            own = {r.info.run_id for e in mine.client.search_experiments()
                   for r in mine.client.search_runs([e.experiment_id], max_results=1000)}
            # each one's encoder is version 1 of its own histcode-encoder, made by one of its own runs
            version = mine.client.get_model_version_by_alias("histcode-encoder", "adco")
            assert version.version == "1" and version.run_id in own
            assert not own & {r.info.run_id for e in other.client.search_experiments()
                              for r in other.client.search_runs([e.experiment_id], max_results=1000)}
        s3 = boto3.client("s3")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="histcode")
                for o in page.get("Contents", [])]
    for ws in (alice, bob):
        assert any(k.startswith(f"lancedb/{ws.project()}/tile_emb__") for k in keys)
        assert any(k.startswith(f"mlflow/workspaces/{ws.project()}/") for k in keys)
        done = _histcode(ws, "sql", "SELECT count(*) AS n FROM tile_embeddings", "--format", "csv",
                         env=_client_env(stack))
        assert done.returncode == 0, done.stderr
        assert int(done.stdout.split()[-1]) == len(_tiles(ws))


def test_sql_search_predict_view_and_mlflow_links_work_against_the_remote_stores(users, stack, tmp_path) -> None:
    alice = users["alice"]
    env = _client_env(stack)
    tile = _tiles(alice).tile_id[0]
    found = _histcode(alice, "search", "--tile", tile, "--k", "3", "--format", "csv", env=env)
    assert found.returncode == 0, found.stderr
    rows = found.stdout.strip().splitlines()
    assert rows[0].startswith("rank,tile_id") and len(rows) == 4  # three neighbours, nearest first
    distances = [float(r.rsplit(",", 1)[1]) for r in rows[1:]]
    assert distances == sorted(distances)
    slide = next(s for s in Catalog.of(alice).slides() if s["status"] == "ok")
    out = tmp_path / "preds.csv"
    predicted = _histcode(alice, "predict", str(alice.path(slide["path"])), "--out", str(out), env=env)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len(out.read_text().strip().splitlines()) == 2
    links = _histcode(alice, "mlflow-ui", env=env)
    assert links.returncode == 0, links.stderr
    urls = [w for w in links.stdout.split() if w.startswith("http://") and "#/experiments/" in w]
    assert urls and all(f"workspace={alice.project()}" in u for u in urls)
    with urllib.request.urlopen(urls[0].split("#")[0], timeout=10) as page:
        assert page.status == 200
    from histcode.services.processes import free_port, http_ok, spawn, stop_process, wait_until

    port = free_port()
    viewer = spawn([sys.executable, "-m", "histcode", "-w", str(alice.root), "view", "--port", str(port)], env,
                   tmp_path / "view.log")
    try:
        wait_until("the viewer", lambda: http_ok(f"http://127.0.0.1:{port}/api/slides"), 120, viewer,
                   tmp_path / "view.log")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/slides", timeout=30) as r:
            listed = json.loads(r.read())["slides"]
        assert {s["slide_id"] for s in listed} >= {slide["slide_id"]}
    finally:
        stop_process(viewer)


def test_no_credential_is_stored_in_mlflow_the_catalog_or_prefect(users, stack) -> None:
    import duckdb
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from histcode.tracking import Tracker

    secrets = [stack._password(), stack.environment()["AWS_SECRET_ACCESS_KEY"]]
    assert all(len(s) >= 16 for s in secrets)
    stored: list[str] = []
    with _using(_client_env(stack)):
        for ws in (users["alice"], users["bob"]):
            client = Tracker(ws).client
            for exp in client.search_experiments():
                stored += [exp.artifact_location, *exp.tags.values()]
                for run in client.search_runs([exp.experiment_id], max_results=1000):
                    stored += [*run.data.params.keys(), *run.data.params.values(), *run.data.tags.values(),
                               run.info.artifact_uri]
            for model in client.search_registered_models():
                stored += [*model.tags.values()]
                for version in client.search_model_versions(f"name = '{model.name}'"):
                    stored += [*version.tags.values(), version.source or ""]
            con = duckdb.connect(str(ws.catalog_path), read_only=True)
            for table, column in con.execute("SELECT table_name, column_name FROM information_schema.columns "
                                             "WHERE data_type = 'VARCHAR'").fetchall():
                stored += [str(v[0]) for v in con.execute(f'SELECT "{column}" FROM "{table}"').fetchall()]
            con.close()
            stored += [p.read_text(errors="replace") for p in ws.root.rglob("*")
                       if p.is_file() and p.suffix in {".json", ".yaml", ".csv", ".md", ".txt", ""}]
        with temporary_settings({PREFECT_API_URL: stack.urls()["prefect"]}):
            with get_client(sync_client=True) as prefect:
                stored += [json.dumps(r.parameters) for r in prefect.read_flow_runs(limit=200)]
                stored += [json.dumps(d.parameters) for d in prefect.read_deployments()]
    assert len(stored) > 100
    for secret in secrets:
        assert not [s for s in stored if secret in s]


# -- faults of the services --------------------------------------------------------------------------------
class Gate:
    """A TCP forwarder to the S3 endpoint that can refuse connections for a while (an endpoint that is down)."""

    def __init__(self, target: int) -> None:
        from histcode.services.processes import free_port

        self.target, self.port, self.open = target, free_port(), True
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self._server.accept()
            if not self.open:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()  # reset: what a stopped endpoint behind a load balancer answers
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _vectors(ws: Workspace, env: dict):
    from histcode.features.read import tile_features

    with _using(env):
        return tile_features(ws, fmt="pandas").sort_values("tile_id").reset_index(drop=True)


def _assert_same_rows(after, before) -> None:
    assert after.drop(columns="vector").equals(before.drop(columns="vector"))
    assert np.array_equal(np.stack(after.vector), np.stack(before.vector))


def _ledger(ws: Workspace) -> list[tuple]:
    return [tuple(r.values()) for r in Catalog.of(ws).query(
        "SELECT view_id, slide_id, status, rows FROM materializations ORDER BY view_id, slide_id")]


def test_object_storage_refusing_is_named_nothing_is_half_committed_and_the_rerun_resumes(users, stack) -> None:
    bob = users["bob"]
    env = _client_env(stack)
    before = _vectors(bob, env)
    ledger = _ledger(bob)
    two = sorted({r[1] for r in ledger})[:2]
    with Catalog.of(bob).transaction() as con:  # two slides to embed again
        con.execute(f"DELETE FROM materializations WHERE slide_id IN ({','.join('?' * len(two))})", two)
    gate = Gate(int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    gate.open = False
    refused = _histcode(bob, "embed", env={**env, "AWS_ENDPOINT_URL": gate.url})
    assert refused.returncode == 3, refused.stdout + refused.stderr
    message = " ".join(refused.stderr.split())
    assert "object storage (S3)" in message and gate.url in message and "Traceback" not in refused.stderr
    assert len(_ledger(bob)) == len(ledger) - 2  # nothing recorded for vectors that were not written
    gate.open = True
    again = _histcode(bob, "embed", env={**env, "AWS_ENDPOINT_URL": gate.url})
    assert again.returncode == 0, again.stderr[-3000:]
    assert _ledger(bob) == ledger
    _assert_same_rows(_vectors(bob, env), before)


def test_a_dask_worker_lost_mid_shard_leaves_the_rows_of_an_uninterrupted_run(users, stack) -> None:
    from histcode.services.processes import alive, stop

    bob = users["bob"]
    env = _client_env(stack)
    before = _vectors(bob, env)
    ledger = _ledger(bob)
    with Catalog.of(bob).transaction() as con:
        con.execute("DELETE FROM materializations")
    embed = subprocess.Popen([sys.executable, "-m", "flows.embed", "--workspace", str(bob.root)], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    staging = bob.outputs_dir / "staging"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(staging.glob("*/shard-*")) and embed.poll() is None:
        time.sleep(0.05)
    victim = stack.state().pids["dask-workers"][0]
    assert embed.poll() is None and list(staging.glob("*/shard-*")), "the embed ended before a shard started"
    assert stop(victim, timeout=0.1)  # the worker is gone mid-shard (SIGTERM, then SIGKILL at once)
    out, _ = embed.communicate(timeout=600)
    assert embed.returncode == 0, out[-4000:]
    summary = json.loads((bob.metrics_dir / "embed.json").read_text())
    if summary["failed"]:  # the shard was lost after its retry: its slides are failed; the rerun embeds them
        rerun = _histcode(bob, "embed", env=env)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _ledger(bob) == ledger
    _assert_same_rows(_vectors(bob, env), before)
    stack.up()  # the lost worker back (alone: the other one kept running) for the tests after this one
    assert stack.dask_worker_count() == 2 and all(alive(pid) for pid in stack.state().pids["dask-workers"])


def test_a_stopped_mlflow_server_is_named_and_pretraining_resumes_when_it_is_back(users, stack) -> None:
    from histcode.tracking import Tracker

    alice = users["alice"]
    env = _client_env(stack)
    t0 = time.time()
    started = subprocess.Popen([sys.executable, "-m", "histcode", "-w", str(alice.root), "pretrain", "--steps",
                                "400", "--force"], env=env, cwd=alice.root, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    with _using(env):
        tracker = Tracker(alice)
        pretrain = tracker.client.get_experiment_by_name("pretrain").experiment_id
        known = {r.info.run_id for r in tracker.client.search_runs([pretrain])}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and started.poll() is None:
            runs = [r for r in tracker.client.search_runs([pretrain], "attributes.status = 'RUNNING'")
                    if r.info.run_id not in known]
            if runs and [p for p in alice.outputs_dir.rglob("checkpoint.pt") if p.stat().st_mtime > t0]:
                break  # a checkpoint of this run is on disk: what was done so far can be resumed
            time.sleep(0.5)
    stack.stop_service("mlflow")
    try:
        _, err = started.communicate(timeout=600)
    finally:
        stack.up()
    message = " ".join(err.split())
    assert started.returncode == 3, err[-3000:]
    assert "MLflow tracking server" in message and stack.urls()["mlflow"] in message
    resumed = _histcode(alice, "pretrain", "--steps", "400", "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((alice.metrics_dir / "pretrain.json").read_text())["resumed_from_step"] >= 25
    with _using(env):
        tracker = Tracker(alice)
        runs = [r for r in tracker.client.search_runs([pretrain]) if r.info.run_id not in known]
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the killed run itself, continued
        for version in tracker.client.search_model_versions("name = 'histcode-encoder'"):  # each has its model
            assert tracker.load_model(f"models:/histcode-encoder/{version.version}") is not None


def test_a_postgresql_restart_is_survived_by_both_servers(users, stack) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from histcode.tracking import Tracker

    import psycopg2

    cluster = stack.postgres()
    con = psycopg2.connect(host="127.0.0.1", port=cluster.port, user="histcode", password=stack._password(),
                           dbname="prefect")
    with con, con.cursor() as cur:  # both servers keep their state in this PostgreSQL
        cur.execute("SELECT count(*) FROM flow_run")
        assert cur.fetchall()[0][0] >= 2
    con.close()
    con = psycopg2.connect(host="127.0.0.1", port=cluster.port, user="histcode", password=stack._password(),
                           dbname="mlflow")
    with con, con.cursor() as cur:
        cur.execute("SELECT count(DISTINCT workspace) FROM experiments")
        assert cur.fetchall()[0][0] >= 2
    con.close()
    cluster.restart()
    with _using(_client_env(stack)):
        tracker = Tracker(users["alice"])
        assert tracker.client.search_experiments()
        run_id = tracker.start_run("pretrain", "after-restart")
        tracker.end_run(run_id)
        with temporary_settings({PREFECT_API_URL: stack.urls()["prefect"]}):
            with get_client(sync_client=True) as prefect:
                assert prefect.read_deployments()


def test_two_writers_of_one_catalog_get_a_clear_error_naming_the_holder(users, stack, tmp_path) -> None:
    alice = users["alice"]
    sid = Catalog.of(alice).slides()[0]["slide_id"]
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(alice.catalog_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        env = {**_client_env(stack), "HISTCODE_CATALOG_WAIT_S": "1"}
        blocked = _histcode(alice, "cohorts", "move", sid, "--to", "demo", env=env)
        message = " ".join(blocked.stderr.split())
        assert blocked.returncode != 0
        assert f"in use by PID {holder.pid}" in message and socket.gethostname() in message, message
    finally:
        holder.kill()
        holder.wait()
    assert _histcode(alice, "cohorts", "move", sid, "--to", "demo", env=_client_env(stack)).returncode == 0
    assert Catalog.of(alice).slides()  # the catalog is whole


def test_histcode_services_commands_drive_the_same_stack(users, stack) -> None:
    """`histcode services up` on a running stack starts nothing; `env` prints its variables; `down` stops
    everything and `status` then says so (this runs last: the stack is down after it)."""
    import shlex

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "histcode", "services", *args, "--dir", str(stack.folder)],
                              capture_output=True, text=True, timeout=300, cwd=REPO)

    pids = stack.state().pids
    up = cli("up")
    assert up.returncode == 0, up.stderr
    assert stack.state().pids == pids  # all was running: nothing restarted
    exported = dict(shlex.split(line)[1].split("=", 1) for line in cli("env").stdout.strip().splitlines())
    assert exported == stack.environment() and exported == dict(
        shlex.split(line)[1].split("=", 1) for line in up.stdout.strip().splitlines())
    assert cli("status").returncode == 0
    assert cli("down").returncode == 0
    status = cli("status")
    assert status.returncode == 1 and "DOWN" in status.stdout
    assert not any(port_up for port_up in (stack.status()[n]["up"] for n in ("mlflow", "prefect", "s3")))


def test_the_slurm_recipe_renders_a_job_whose_worker_joins_its_scheduler(tmp_path) -> None:
    """The dask-jobqueue recipe of docs/scaling.md ("Shared services"): SLURMCluster's job script carries the
    environment lines, and its worker command (what SLURM would run on a node; there is no SLURM here) joins the
    cluster's scheduler."""
    import shlex

    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from histcode.services.processes import spawn, stop_process, wait_until

    prologue = ["export HISTCODE_MLFLOW_URI=http://mlflow:5000", f"cd {tmp_path}"]
    with SLURMCluster(queue="gpu", cores=1, memory="2GB", processes=1, job_extra_directives=["--gres=gpu:1"],
                      job_script_prologue=prologue, scheduler_options={"host": "127.0.0.1"}) as cluster:
        script = cluster.job_script()
        assert "#SBATCH -p gpu" in script and "#SBATCH --gres=gpu:1" in script
        assert all(line in script for line in prologue)
        command = next(line for line in script.splitlines() if "dask_worker" in line)
        assert cluster.scheduler_address in command
        worker = spawn(shlex.split(command), {**os.environ}, tmp_path / "worker.log")
        try:
            with Client(cluster) as client:
                wait_until("the job's worker", lambda: len(client.scheduler_info()["workers"]) == 1, 120, worker,
                           tmp_path / "worker.log")
                assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        finally:
            stop_process(worker)
