"""A local Prefect server, the ``histcode`` process work pool, the deployments of prefect.yaml and a worker.

    python -m flows.serve [--port 4200] [--host 127.0.0.1] [--logs DIR]    # or: histcode serve, make serve

then, in another shell: ``prefect deployment run 'histcode-pipeline/demo'`` (with
``PREFECT_API_URL=http://127.0.0.1:4200/api``) and watch it at http://127.0.0.1:4200. Ctrl-C stops the worker and
the server. Tag concurrency limits are created on the way: ``gpu`` 1 (pretraining, embedding, heads share the
accelerator) and ``tiling`` 4.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("histcode.serve")

REPO = Path(__file__).resolve().parent.parent
POOL = "histcode"
TAG_LIMITS = {"gpu": 1, "tiling": 4}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _prefect() -> list[str]:
    exe = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
    return [exe] if exe else [sys.executable, "-m", "prefect"]


def _env(api_url: str, home: Path | None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "GX_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    return env


def _run(args: list[str], env: dict, cwd: Path = REPO) -> str:
    done = subprocess.run(_prefect() + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def wait_healthy(api_url: str, timeout: float = 120, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the Prefect server at {api_url} was not healthy within {timeout:.0f} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def prefect_server(host: str = "127.0.0.1", port: int | None = None, home: Path | None = None,
                   log_file: Path | None = None) -> Iterator[str]:
    """A Prefect server in its own process group; yields its API URL and stops it on exit."""
    port = port or free_port(host)
    api_url = f"http://{host}:{port}/api"
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    server = subprocess.Popen(_prefect() + ["server", "start", "--host", host, "--port", str(port)],
                              env=_env(api_url, home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(api_url, process=server)
        yield api_url
    finally:
        _stop(server)
        if log_file:
            out.close()


def deploy(api_url: str, home: Path | None = None, repo: Path = REPO) -> None:
    """The work pool, the tag concurrency limits and every deployment of ``repo``/prefect.yaml."""
    env = {**_env(api_url, home), "PWD": str(repo)}
    _run(["work-pool", "create", POOL, "--type", "process", "--overwrite"], env, repo)
    for tag, limit in TAG_LIMITS.items():
        _run(["concurrency-limit", "create", tag, str(limit)], env, repo)
    _run(["--no-prompt", "deploy", "--all"], env, repo)


@contextmanager
def worker(api_url: str, home: Path | None = None, repo: Path = REPO, log_file: Path | None = None,
           extra_env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(_prefect() + ["worker", "start", "--pool", POOL], cwd=repo,
                               env={**_env(api_url, home), **(extra_env or {})}, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        _stop(process)
        if log_file:
            out.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--logs", type=Path, default=None,
                        help="folder for the server's and worker's logs (default: the workspace's outputs/logs)")
    args = parser.parse_args(argv)
    if args.logs is None:
        from histcode.workspace import Workspace

        args.logs = Workspace.resolve().outputs_dir / "logs"
    args.logs.mkdir(parents=True, exist_ok=True)
    server_log, worker_log = args.logs / "prefect-server.log", args.logs / "prefect-worker.log"
    for log_file in (server_log, worker_log):
        log_file.touch()  # both exist from the start, where the first line says they are
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def _terminate(*_) -> None:
        raise KeyboardInterrupt  # unwind the context managers: stop the worker, then the server

    signal.signal(signal.SIGTERM, _terminate)
    try:
        log.info("logs: %s, %s", server_log, worker_log)
        with prefect_server(args.host, args.port, log_file=server_log) as api_url:
            deploy(api_url)
            with worker(api_url, log_file=worker_log) as process:
                log.info("Prefect UI: http://%s:%d  (API %s)", args.host, args.port, api_url)
                log.info("trigger:    PREFECT_API_URL=%s prefect deployment run 'histcode-pipeline/demo'", api_url)
                log.info("Ctrl-C stops the worker and the server")
                process.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, at any point: the context managers have stopped everything
        log.info("stopped the worker and the server")

if __name__ == "__main__":
    main()
