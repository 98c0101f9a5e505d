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
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from histcode.services.prefect import POOL, prefect_command, prefect_env
from histcode.services.prefect import deploy as deploy_all
from histcode.services.processes import free_port, http_ok, spawn, stop_process, wait_until

log = logging.getLogger("histcode.serve")

REPO = Path(__file__).resolve().parent.parent


def _env(api_url: str, home: Path | None) -> dict[str, str]:
    return prefect_env(api_url, home)


def wait_healthy(api_url: str, timeout: float = 120, process: subprocess.Popen | None = None) -> None:
    wait_until(f"the Prefect server at {api_url}", lambda: http_ok(f"{api_url}/health"), timeout, process)


@contextmanager
def prefect_server(host: str = "127.0.0.1", port: int | None = None, home: Path | None = None,
                   log_file: Path | None = None) -> Iterator[str]:
    """A Prefect server in its own process group; yields its API URL and stops it on exit."""
    port = port or free_port(host)
    api_url = f"http://{host}:{port}/api"
    server = spawn(prefect_command() + ["server", "start", "--host", host, "--port", str(port)], _env(api_url, home),
                   log_file)
    try:
        wait_healthy(api_url, process=server)
        yield api_url
    finally:
        stop_process(server)


def deploy(api_url: str, home: Path | None = None, repo: Path = REPO) -> None:
    """The work pool, the tag concurrency limits and every deployment of ``repo``/prefect.yaml."""
    deploy_all(api_url, _env(api_url, home), repo)


@contextmanager
def worker(api_url: str, home: Path | None = None, repo: Path = REPO, log_file: Path | None = None,
           extra_env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    process = spawn(prefect_command() + ["worker", "start", "--pool", POOL], {**_env(api_url, home), **(extra_env or {})},
                    log_file, repo)
    try:
        yield process
    finally:
        stop_process(process)


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
