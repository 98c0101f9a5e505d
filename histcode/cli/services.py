"""`histcode` commands that run local servers over a workspace: the Prefect server with its deployments and a
worker (`serve`), the MLflow UI (`mlflow-ui`) and the slide viewer (`view`). All honour ``--workspace`` / ``$HISTCODE_HOME`` and stop
everything they started on Ctrl-C or SIGTERM."""

from __future__ import annotations

from typing import Annotated

import typer

from histcode.cli.common import fail, terminal, workspace_of


def _supervise(command: list[str], cwd, env: dict) -> None:
    """Run ``command`` until it exits; SIGTERM is passed on, Ctrl-C reaches it by itself."""
    import signal
    import subprocess

    child = subprocess.Popen(command, cwd=cwd, env=env)
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    try:
        code = child.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C and is shutting down
        code = child.wait()
    raise typer.Exit(code)


def _env(ws) -> dict:
    import os
    import sys

    return {**os.environ, "HISTCODE_HOME": str(ws.root), "MLFLOW_DISABLE_TELEMETRY": "true",
            "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}


def serve(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Prefect server port.")] = 4200,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
) -> None:
    """A local Prefect server, the work pool, prefect.yaml's deployments and a worker whose flow runs use this
    workspace (Ctrl-C stops them). Server and worker logs go to the workspace's outputs/logs/."""
    import sys

    from histcode.workspace import repository_root

    ws = workspace_of(ctx)
    repo = repository_root()
    if repo is None or not (repo / "flows" / "serve.py").is_file():
        fail("`histcode serve` needs the source checkout (flows/ and prefect.yaml): install with `pip install -e .`")
    logs = ws.outputs_dir / "logs"
    terminal().print(f"workspace {ws.root}; Prefect server and worker logs in {logs}")
    _supervise([sys.executable, "-m", "flows.serve", "--port", str(port), "--host", host, "--logs", str(logs)], repo,
               _env(ws))


def experiment_links(tracker, base: str) -> list[str]:
    """One line per experiment: its name and the UI link that opens its training runs (in the tracker's MLflow
    workspace on a shared server)."""
    scope = f"&workspace={tracker.mlflow_workspace}" if tracker.mlflow_workspace else ""
    return [f"  {exp.name:10s} {base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning{scope}"
            for exp in tracker.client.search_experiments() if exp.name != "Default"]


def mlflow_ui(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port of the UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
) -> None:
    """The MLflow UI over this workspace's runs, models and artifacts, with links that open straight on the
    training runs (MLflow 3 otherwise opens experiments in its GenAI view, where they look empty)."""
    import sys
    from pathlib import Path

    from histcode.tracking import Tracker, telemetry_off

    telemetry_off()
    ws = workspace_of(ctx)
    tracker = Tracker(ws)  # a copied or moved store is pointed at this workspace before the UI reads it
    console = terminal()
    if not ws.mlflow_is_local:  # a tracking server has its UI: the links open this workspace's runs in it
        console.print(f"this workspace's runs are on the MLflow server {ws.mlflow_uri}"
                      + (f", MLflow workspace {tracker.mlflow_workspace}" if tracker.mlflow_workspace else ""))
        for line in experiment_links(tracker, ws.mlflow_uri.rstrip("/")):
            console.print(line, soft_wrap=True)
        return
    console.print(f"MLflow UI over {ws.mlflow_uri} on http://{host}:{port}")
    for line in experiment_links(tracker, f"http://{host}:{port}"):
        console.print(line, soft_wrap=True)
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow)] if mlflow.is_file() else [sys.executable, "-m", "mlflow"]
    _supervise([*command, "ui", "--backend-store-uri", ws.mlflow_uri, "--host", host, "--port", str(port)], ws.root,
               _env(ws))


def view(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port of the viewer.")] = 8765,
    host: Annotated[str, typer.Option(help="Interface to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
) -> None:
    """The slide viewer in the browser: the cohort with the heads' predictions, each slide in deep zoom with its
    attention, gene scores, ground truth and tile grid as overlays, and similar tiles and slides a click away.
    Read-only over the workspace."""
    from histcode.errors import MissingExtra, require

    try:
        uvicorn = require("uvicorn", "viewer", "`histcode view`")
        for module in ("starlette", "jinja2"):
            require(module, "viewer", "`histcode view`")
    except MissingExtra as exc:
        fail(str(exc))
    from histcode.tracking import telemetry_off
    from histcode.viewer import create_app

    telemetry_off()
    ws = workspace_of(ctx)
    if not ws.catalog_path.exists():
        fail(f"no catalog in {ws.root}: run `histcode demo` or `histcode ingest` first")
    console = terminal()
    console.print(f"HistCode viewer over {ws.root} on http://{host}:{port}/", soft_wrap=True)
    if host in ("127.0.0.1", "localhost", "::1"):
        console.print(f"bound to {host}: reachable from this machine only (--host 0.0.0.0 to share it on the network)")
    else:
        console.print(f"bound to {host}: anyone who can reach this machine on port {port} can see the slides")
    uvicorn.run(create_app(ws), host=host, port=port, log_level="warning")


COMMANDS = (
    ("serve", serve),
    ("mlflow-ui", mlflow_ui),
    ("view", view),
)
