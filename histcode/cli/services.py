"""`histcode` commands that run local servers over a workspace: the Prefect server with its deployments and a
worker (`serve`), the MLflow UI (`mlflow-ui`) and the slide viewer (`view`). All honour ``--workspace`` / ``$HISTCODE_HOME`` and stop
everything they started on Ctrl-C or SIGTERM."""

from __future__ import annotations

from typing import Annotated, Optional

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
    host: Annotated[str, typer.Option(help="Interface to listen on (127.0.0.1: this machine only; another needs "
                                           "--public).")] = "127.0.0.1",
    public: Annotated[bool, typer.Option("--public", help="Allow a --host the network can reach; a token is then "
                                                          "required (made and printed unless --token or --auth-header "
                                                          "is given).")] = False,
    token: Annotated[Optional[str], typer.Option(envvar="HISTCODE_VIEW_TOKEN", show_envvar=True,
                                                 help="The token every request must carry (?token=..., its cookie, "
                                                      "or Authorization: Bearer); 16+ URL-safe characters.")] = None,
    auth_header: Annotated[Optional[str], typer.Option(help="Trust this request header, set by an authenticating "
                                                            "reverse proxy (e.g. X-Forwarded-User), instead of a "
                                                            "token.")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option("--allowed-host", help="Also answer requests naming "
                                                              "this Host (repeatable; *.example.org: its subdomains)."
                                                              )] = None,
) -> None:
    """The slide viewer in the browser: the cohort with the heads' predictions, each slide in deep zoom with its
    attention, gene scores, ground truth and tile grid as overlays, and similar tiles and slides a click away.
    Read-only over the workspace (nothing in it is written, a read-only workspace included).

    It answers on 127.0.0.1 for requests naming a loopback host (or --allowed-host). A --host the network can
    reach is refused without --public, which then requires a token or a proxy's --auth-header."""
    import re
    import secrets

    from histcode.errors import MissingExtra, require

    try:
        uvicorn = require("uvicorn", "viewer", "`histcode view`")
        for module in ("starlette", "jinja2"):
            require(module, "viewer", "`histcode view`")
    except MissingExtra as exc:
        fail(str(exc))
    from histcode.tracking import telemetry_off
    from histcode.viewer import create_app
    from histcode.viewer.access import LOOPBACK_HOSTS, Access, is_loopback
    from histcode.workspace import Workspace

    telemetry_off()
    if ctx.obj is not None:
        ctx.obj.read_only = True  # no catalog backup after it either (common.backup_after)
    ws = Workspace.resolve(ctx.obj.workspace if ctx.obj else None)  # not ensure()d: the viewer creates nothing
    if not ws.catalog_path.exists():
        fail(f"no catalog in {ws.root}: run `histcode demo` or `histcode ingest` first")
    local = is_loopback(host)
    if not local and not public:
        fail(f"--host {host} is not a loopback address: the cohort (patient ids, predictions, slides) would be open "
             "to the network. Add --public to share it; a token is then required (made and printed, or --token), or "
             "--auth-header NAME behind a reverse proxy that authenticates")
    if token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{16,256}", token):
        fail("--token (or $HISTCODE_VIEW_TOKEN) must be 16 to 256 URL-safe characters (letters, digits, . _ ~ -)")
    if auth_header is not None and not re.fullmatch(r"[A-Za-z0-9-]{1,64}", auth_header):
        fail(f"--auth-header {auth_header!r} is not a header name (letters, digits and -)")
    made = False
    if public and token is None and auth_header is None:
        token, made = secrets.token_urlsafe(24), True
    wildcard = host.strip("[]") in ("0.0.0.0", "::", "")
    machine = _machine_names() if not local else []
    hosts = [*LOOPBACK_HOSTS, *([] if local or wildcard else [host]), *machine, *(allowed_host or [])]
    access = Access(tuple(hosts), token=token, auth_header=auth_header, cookie=f"histcode-viewer-token-{port}")
    shown = machine[0] if wildcard and machine else host.strip("[]")
    shown = f"[{shown}]" if ":" in shown else shown
    console = terminal()
    console.print(f"HistCode viewer over {ws.root} on http://{shown}:{port}/", soft_wrap=True)
    if local:
        console.print(f"bound to {host}: reachable from this machine only")
    else:
        console.print(f"bound to {host}: reachable from the network on port {port} (--public); TLS is left to a "
                      "proxy in front")
    console.print(f"answers requests for host {', '.join(access.allowed_hosts)} (--allowed-host NAME for another)",
                  soft_wrap=True)
    if token:
        console.print(f"token required{' (made for this run)' if made else ''}: open "
                      f"http://{shown}:{port}/?token={token}", soft_wrap=True, highlight=False)
    if auth_header:
        console.print(f"trusting the {auth_header} header of an authenticating proxy: let only the proxy reach port "
                      f"{port}, and have it drop that header from what clients send", soft_wrap=True)
    if not token and not auth_header:
        console.print("no token: anyone who can open a page on this machine can read the cohort")
    uvicorn.run(create_app(ws, access=access), host=host.strip("[]"), port=port, log_level="warning")


def _machine_names() -> list[str]:
    """This machine's name and the addresses it resolves to (for a viewer bound to every interface)."""
    import socket

    names = []
    try:
        name = socket.gethostname().lower()
        names.append(name)
        names.extend(sorted({info[4][0] for info in socket.getaddrinfo(name, None)}))
    except OSError:
        pass
    return [n for n in dict.fromkeys(names) if n and n not in ("127.0.0.1", "::1", "localhost")]


COMMANDS = (
    ("serve", serve),
    ("mlflow-ui", mlflow_ui),
    ("view", view),
)
