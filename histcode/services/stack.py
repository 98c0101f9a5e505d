"""The shared set-up of a lab on one machine, every service a separate process on 127.0.0.1:

- PostgreSQL (the distribution's), with one database for MLflow and one for Prefect;
- an S3-compatible endpoint (moto's server), one bucket for the vectors and MLflow's artifacts;
- ``mlflow server`` on PostgreSQL with ``--artifacts-destination s3://<bucket>/mlflow`` and MLflow workspaces
  enabled (each HistCode workspace keeps its runs, models and aliases in an MLflow workspace of its own);
- ``prefect server`` on PostgreSQL, the ``histcode`` process work pool with prefect.yaml's deployments, and a
  worker;
- a Dask scheduler and ``dask_workers`` ``dask worker`` processes.

``Stack(folder).up()`` starts what is not running, on the ports it had (the state, logs and PostgreSQL's data
stay in ``folder``, so ``down`` then ``up`` keeps the runs' records; moto keeps its objects in memory, so the
artifacts and vector tables are gone after ``down``); ``environment()`` is what a HistCode process exports to use it (no
PostgreSQL password: only the servers read it, from a libpq password file). ``histcode services up|status|env|
down`` drives it; the tests start one per session.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from histcode.errors import ServiceUnavailable
from histcode.services.postgres import HOST, PostgresCluster, service_user, write_passfile
from histcode.services.prefect import POOL, deploy
from histcode.services.stack_env import TELEMETRY_OFF
from histcode.services.processes import ServiceError, alive, free_port, http_ok, port_open, spawn, stop, wait_until

log = logging.getLogger(__name__)

BUCKET = "histcode"
REGION = "us-east-1"
SERVICES = ("postgres", "s3", "mlflow", "prefect", "dask-scheduler", "dask-workers", "prefect-worker")


def _exe(name: str) -> str:
    """A console script of this environment (next to its python), else on PATH."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"{name} is not installed in this environment: pip install 'histcode[server]'")
    return found


@dataclass
class StackState:
    """What ``up`` started: ports, pids, the generated credentials' files. Kept in ``state.json`` (0600)."""

    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, list[int]] = field(default_factory=dict)
    s3_key: str = ""
    s3_secret: str = ""

    @classmethod
    def read(cls, path: Path) -> StackState:
        if not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text()))

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.touch(mode=0o600)
        tmp.chmod(0o600)
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        tmp.replace(path)


class Stack:
    def __init__(self, folder: str | Path, dask_workers: int = 2, repo: Path | None = None) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.dask_workers = dask_workers
        self.repo = repo
        self.logs = self.folder / "logs"

    # -- state -------------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    @property
    def passfile(self) -> Path:
        return self.folder / "pgpass"

    def state(self) -> StackState:
        return StackState.read(self.state_path)

    def postgres(self, state: StackState | None = None) -> PostgresCluster:
        state = state or self.state()
        return PostgresCluster(self._postgres_root(), state.ports.get("postgres", 0))

    def _postgres_root(self) -> Path:
        """``folder/postgres``; as root, a folder the service user can reach (the stack's folder may sit in a
        root-only directory such as pytest's temporary folders)."""
        if service_user() is None:
            return self.folder / "postgres"
        digest = hashlib.sha256(str(self.folder).encode()).hexdigest()[:12]
        return Path("/var/tmp") / f"histcode-postgres-{digest}"

    def _password(self) -> str:
        """The PostgreSQL password, generated once and kept only in the libpq password file."""
        if self.passfile.is_file():
            return self.passfile.read_text().strip().rsplit(":", 1)[1].replace("\\:", ":").replace("\\\\", "\\")
        return secrets.token_urlsafe(18)

    # -- the environment ---------------------------------------------------------------------------------
    def urls(self, state: StackState | None = None) -> dict[str, str]:
        p = (state or self.state()).ports
        return {"postgres": f"postgresql://{HOST}:{p.get('postgres')}", "s3": f"http://{HOST}:{p.get('s3')}",
                "mlflow": f"http://{HOST}:{p.get('mlflow')}", "prefect": f"http://{HOST}:{p.get('prefect')}/api",
                "dask": f"tcp://{HOST}:{p.get('dask-scheduler')}"}

    def environment(self, state: StackState | None = None) -> dict[str, str]:
        """What a HistCode process (CLI, flow run, Dask worker) exports to use the stack."""
        state = state or self.state()
        urls = self.urls(state)
        return {
            "HISTCODE_MLFLOW_URI": urls["mlflow"],
            "HISTCODE_LANCEDB_URI": f"s3://{BUCKET}/lancedb",
            "HISTCODE_DASK_ADDRESS": urls["dask"],
            "PREFECT_API_URL": urls["prefect"],
            "AWS_ACCESS_KEY_ID": state.s3_key,
            "AWS_SECRET_ACCESS_KEY": state.s3_secret,
            "AWS_ENDPOINT_URL": urls["s3"],  # boto3 and LanceDB read it
            "AWS_ALLOW_HTTP": "true",
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    def _server_env(self, state: StackState) -> dict[str, str]:
        env = {**os.environ, **TELEMETRY_OFF, **self.environment(state), "PGPASSFILE": str(self.passfile),
               "MLFLOW_S3_ENDPOINT_URL": self.urls(state)["s3"], "PREFECT_HOME": str(self.folder / "prefect-home"),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("HISTCODE_HOME", None)
        if self.repo is not None:  # Dask workers unpickle the flows' tasks by module (flows.embed, ...)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.repo), os.environ.get("PYTHONPATH")) if p)
        return env

    # -- up / down ---------------------------------------------------------------------------------------
    def up(self, timeout: float = 180) -> dict[str, str]:
        """Start every service that is not running (in dependency order); returns ``environment()``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        state = self.state()
        for name in ("postgres", "s3", "mlflow", "prefect", "dask-scheduler"):  # a port once chosen is kept
            if name not in state.ports:
                state.ports[name] = free_port()
        state.s3_key = state.s3_key or "histcode-" + secrets.token_hex(4)
        state.s3_secret = state.s3_secret or secrets.token_urlsafe(24)
        state.write(self.state_path)
        password = self._password()
        write_passfile(self.passfile, state.ports["postgres"], password)
        env = self._server_env(state)

        cluster = self.postgres(state)
        cluster.init(password)
        cluster.start()
        for db in ("mlflow", "prefect"):
            cluster.create_database(db, password)

        self._start(state, "s3", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(state.ports["s3"])], env,
                    lambda: port_open(HOST, state.ports["s3"]), timeout)
        self._bucket(env)
        self._start(state, "mlflow", [
            _exe("mlflow"), "server", "--backend-store-uri", cluster.url("mlflow", "postgresql+psycopg2"),
            "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--enable-workspaces",
            "--host", HOST, "--port", str(state.ports["mlflow"]), "--workers", "1"],
            env, lambda: http_ok(f"{self.urls(state)['mlflow']}/health"), timeout)
        prefect_env = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": cluster.url("prefect", "postgresql+asyncpg")}
        self._start(state, "prefect", [_exe("prefect"), "server", "start", "--host", HOST, "--port",
                                       str(state.ports["prefect"])],
                    prefect_env, lambda: http_ok(f"{self.urls(state)['prefect']}/health"), timeout)
        scheduler = self.urls(state)["dask"]
        self._start(state, "dask-scheduler", [_exe("dask"), "scheduler", "--host", HOST, "--port",
                                              str(state.ports["dask-scheduler"]), "--no-dashboard"],
                    env, lambda: port_open(HOST, state.ports["dask-scheduler"]), timeout)
        workers = list(state.pids.get("dask-workers", []))[: self.dask_workers]
        workers += [0] * (self.dask_workers - len(workers))
        for i, pid in enumerate(workers):  # each worker keeps its name; only the ones that died start again
            if pid and alive(pid):
                continue
            process = spawn([_exe("dask"), "worker", scheduler, "--nworkers", "1", "--nthreads", "1",
                             "--name", f"histcode-{i}", "--no-dashboard", "--local-directory",
                             str(self.folder / "dask")], env, self.logs / f"dask-worker-{i}.log", self.repo)
            workers[i] = process.pid
        if workers != state.pids.get("dask-workers"):
            state.pids["dask-workers"] = workers
            state.write(self.state_path)
            wait_until(f"{self.dask_workers} Dask workers", lambda: self.dask_worker_count(state) >= self.dask_workers,
                       timeout, log_file=self.logs / "dask-worker-0.log")
        if self.repo is not None:
            self._deploy(state, env, timeout)
        state.write(self.state_path)
        return self.environment(state)

    def _alive(self, state: StackState, name: str) -> bool:
        pids = state.pids.get(name) or []
        return bool(pids) and all(alive(pid) for pid in pids)

    def _start(self, state: StackState, name: str, argv: list[str], env: dict, ready, timeout: float) -> None:
        if self._alive(state, name) and ready():
            return
        log_file = self.logs / f"{name}.log"
        process = spawn(argv, env, log_file, self.repo)
        state.pids[name] = [process.pid]
        state.write(self.state_path)
        wait_until(name, ready, timeout, process, log_file)
        log.info("%s up (pid %d, log %s)", name, process.pid, log_file)

    def _bucket(self, env: dict) -> None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=REGION,
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        if BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=BUCKET)

    def _deploy(self, state: StackState, env: dict, timeout: float) -> None:
        """The work pool, prefect.yaml's deployments and a process worker (flow runs inherit the stack's env)."""
        deploy(self.urls(state)["prefect"], env, self.repo)
        self._start(state, "prefect-worker", [_exe("prefect"), "worker", "start", "--pool", POOL], env,
                    lambda: True, timeout)

    def dask_worker_count(self, state: StackState | None = None) -> int:
        try:
            return scheduler_workers(self.urls(state)["dask"], timeout=5)
        except ServiceUnavailable:
            return 0

    def status(self) -> dict[str, dict]:
        """Per service: its pids, whether they are alive and whether it answers."""
        state = self.state()
        urls = self.urls(state)
        answers = {
            "postgres": lambda: self.postgres(state).running,
            "s3": lambda: port_open(HOST, state.ports.get("s3", 0)),
            "mlflow": lambda: http_ok(f"{urls['mlflow']}/health"),
            "prefect": lambda: http_ok(f"{urls['prefect']}/health"),
            "dask-scheduler": lambda: port_open(HOST, state.ports.get("dask-scheduler", 0)),
            "dask-workers": lambda: self.dask_worker_count(state) > 0,
            "prefect-worker": lambda: self._alive(state, "prefect-worker"),
        }
        out = {}
        for name in SERVICES:
            pids = state.pids.get(name, []) if name != "postgres" else [p for p in [self.postgres(state).pid] if p]
            out[name] = {"pids": pids, "up": bool(state.ports or pids) and answers[name](),
                         "url": urls.get(name.split("-")[0] if name.startswith("dask") else name)}
        return out

    def stop_service(self, name: str, state: StackState | None = None) -> None:
        """Stop one service (the fault tests; ``up`` starts it again)."""
        state = state or self.state()
        if name == "postgres":
            if state.ports.get("postgres"):
                self.postgres(state).stop()
            return
        for pid in state.pids.pop(name, []):
            stop(pid)

    def down(self, remove: bool = False) -> None:
        """Stop everything (workers first); ``remove``: also delete the state, logs and PostgreSQL's data."""
        state = self.state()
        for name in reversed(SERVICES):
            self.stop_service(name, state)
        if remove:
            shutil.rmtree(self._postgres_root(), ignore_errors=True)
            shutil.rmtree(self.folder, ignore_errors=True)
        elif self.state_path.exists():
            state.write(self.state_path)


def scheduler_workers(address: str, timeout: float = 10) -> int:
    """How many workers the Dask scheduler at ``address`` has now; one that does not answer is a
    ``ServiceUnavailable`` naming it."""
    from distributed import Client

    try:
        with Client(address, timeout=timeout) as client:
            return len(client.scheduler_info(n_workers=-1)["workers"])
    except (OSError, TimeoutError) as exc:
        raise ServiceUnavailable("Dask scheduler", address, str(exc).splitlines()[0] if str(exc) else "timed out") from exc


def shell_exports(env: dict[str, str]) -> str:
    """``export NAME=value`` lines, quoted for a POSIX shell."""
    import shlex

    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
