"""Prefect's side of a server: the ``histcode`` process work pool, the tag concurrency limits and the
deployments of prefect.yaml, made through Prefect's own command line against a running server's API."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from histcode.services.processes import ServiceError
from histcode.services.stack_env import TELEMETRY_OFF

POOL = "histcode"
TAG_LIMITS = {"gpu": 1, "tiling": 4}


def prefect_command() -> list[str]:
    exe = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
    return [exe] if exe else [sys.executable, "-m", "prefect"]


def prefect_env(api_url: str, home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **TELEMETRY_OFF, "PREFECT_API_URL": api_url}
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    return env


def run_prefect(args: list[str], env: dict, cwd: Path) -> str:
    import subprocess

    done = subprocess.run(prefect_command() + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise ServiceError(f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def deploy(api_url: str, env: dict[str, str], repo: Path) -> None:
    """The work pool, the tag concurrency limits and every deployment of ``repo``/prefect.yaml (whose flow runs
    start in ``repo``)."""
    env = {**env, "PREFECT_API_URL": api_url, "PWD": str(repo)}
    run_prefect(["work-pool", "create", POOL, "--type", "process", "--overwrite"], env, repo)
    for tag, limit in TAG_LIMITS.items():
        run_prefect(["concurrency-limit", "create", tag, str(limit)], env, repo)
    run_prefect(["--no-prompt", "deploy", "--all"], env, repo)
