"""`histcode services up|status|env|down`: the shared set-up of a lab on this machine (PostgreSQL, an S3
endpoint, MLflow and Prefect servers on PostgreSQL, a Dask scheduler with workers), each a process on
127.0.0.1, for a user who wants to see HistCode against shared services before a lab runs them for real."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histcode.cli.common import fail, terminal

HELP = "A local stack of the shared services (PostgreSQL, S3, MLflow, Prefect, Dask) on 127.0.0.1."
DEFAULT_DIR = Path("~/.histcode/services")

Folder = Annotated[Path, typer.Option("--dir", help="Where the stack keeps its state, logs and PostgreSQL's data.")]


def _stderr():
    """Progress and status on stderr, so that `eval "$(histcode services up)"` reads only the exports."""
    from rich.console import Console

    return Console(stderr=True)


def _print_status(console, rows: dict[str, dict]) -> None:
    for name, row in rows.items():
        console.print(f"{name:15s} {'up' if row['up'] else 'DOWN':5s} {row['url'] or ''}  pids {row['pids']}")


def _stack(folder: Path, workers: int = 2):
    from histcode.services.stack import Stack
    from histcode.workspace import repository_root

    return Stack(folder, dask_workers=workers, repo=repository_root())


def up(folder: Folder = DEFAULT_DIR,
       workers: Annotated[int, typer.Option(help="Dask worker processes.")] = 2) -> None:
    """Start every service that is not running and print the environment to export (also `histcode services
    env`). Rerunning it starts only what stopped; the runs and tables stay in the stack's folder."""
    from histcode.services.processes import ServiceError
    from histcode.services.stack import shell_exports

    stack = _stack(folder, workers)
    console = _stderr()
    if stack.repo is None:
        console.print("no source checkout: the Prefect deployments and worker are not started", style="yellow")
    try:
        with console.status("starting PostgreSQL, S3, MLflow, Prefect and Dask on 127.0.0.1 ..."):
            env = stack.up()
    except ServiceError as exc:
        fail(str(exc))
    _print_status(console, stack.status())
    console.print(f"logs in {stack.logs}; to use the stack in a shell: eval \"$(histcode services env --dir "
                  f"{stack.folder})\"", soft_wrap=True)
    typer.echo(shell_exports(env))


def status(folder: Folder = DEFAULT_DIR) -> None:
    """Which services of the stack run and answer (exit 1 when one does not)."""
    stack = _stack(folder)
    if not stack.state_path.exists():
        fail(f"no stack in {stack.folder}: `histcode services up` starts one", code=1)
    rows = stack.status()
    _print_status(terminal(), rows)
    raise typer.Exit(0 if all(r["up"] for r in rows.values()) else 1)


def env(folder: Folder = DEFAULT_DIR) -> None:
    """The `export` lines that point HistCode (and mlflow, prefect, boto3) at the stack."""
    from histcode.services.stack import shell_exports

    stack = _stack(folder)
    if not stack.state_path.exists():
        fail(f"no stack in {stack.folder}: `histcode services up` starts one")
    typer.echo(shell_exports(stack.environment()))


def down(folder: Folder = DEFAULT_DIR,
         remove: Annotated[bool, typer.Option("--remove", help="Also delete its data (runs, vectors, logs).")] = False) -> None:
    """Stop every service of the stack (workers first, PostgreSQL last)."""
    stack = _stack(folder)
    if not stack.state_path.exists():
        fail(f"no stack in {stack.folder}")
    stack.down(remove=remove)
    terminal().print(f"stopped the stack in {stack.folder}" + (" and removed its data" if remove else ""))


COMMANDS = (("up", up), ("status", status), ("env", env), ("down", down))
