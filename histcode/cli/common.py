"""What every `histcode` command shares: the global options, the workspace and config of the invocation,
errors, the console and table/CSV/JSON output. Command modules import this; nothing here imports them.

Errors reach the user as one line each (``told_error``): HistCode's own (exit 2), a shared service that does not
answer (exit 3), a fault of the machine such as a full disk (exit 4: what happened, what was kept, how to
recover). After a command that wrote the catalog, the catalog is backed up (``histcode.store.backup``)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer


@dataclass
class State:
    """Options given before the command, carried on the click context (no module-level state)."""

    workspace: Optional[Path] = None
    read_only: bool = False  # a command that must write nothing in the workspace (`histcode view`): no backup either


def setup_logging(verbose: int) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=True)], force=True)
    logging.getLogger("histcode").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def _print_version(value: bool) -> None:
    if value:
        from histcode import __version__

        typer.echo(f"histcode {__version__}")
        raise typer.Exit()


def told_error(exc: BaseException) -> tuple[str, int] | None:
    """(the one line a user reads, the exit status) for an error a command ended with; None for a bug, which
    keeps its traceback. A library error that was not wrapped still says whether it was the machine's."""
    from histcode.errors import HistcodeError, is_machine_fault, machine_fault, service_error_of

    outage = service_error_of(exc)
    if outage is not None:
        return str(outage), 3
    if isinstance(exc, HistcodeError):
        return str(exc), 4 if is_machine_fault(exc) else 2
    fault = machine_fault(exc, "running this command",
                          "what the command committed before it is kept, nothing of the step it stopped")
    return (str(fault), 4) if fault is not None else None


def catalog_signature(state: State | None) -> tuple[int, int] | None:
    """(size, mtime) of the invocation's catalog; None when there is none (or no workspace can be named)."""
    from histcode.workspace import Workspace

    try:
        st = Workspace.resolve(state.workspace if state else None).catalog_path.stat()
    except (OSError, ValueError):
        return None
    return st.st_size, st.st_mtime_ns


def backup_after(state: State, before: tuple[int, int] | None = None) -> None:
    """The catalog copied to ``catalog.duckdb.bak`` when this command wrote it (it is no longer as it was when
    the command started, ``before``) and it is whole; a command that only read, or must write nothing
    (``State.read_only``), leaves no backup."""
    from histcode.store.backup import backup_catalog
    from histcode.workspace import Workspace

    if state is None or state.read_only or catalog_signature(state) in (before, None):
        return
    try:
        backup_catalog(Workspace.resolve(state.workspace).catalog_path)
    except Exception as exc:  # noqa: BLE001 -- a backup never turns a finished command into a failed one
        logging.getLogger(__name__).warning("no catalog backup: %s", exc)


def main_options(
    ctx: typer.Context,
    workspace: Annotated[Optional[Path], typer.Option("--workspace", "-w", help="Workspace directory (default: $HISTCODE_HOME, else the repository root).")] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging (-vv for debug).")] = 0,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print HistCode's version and exit.")] = False,
) -> None:
    setup_logging(verbose)
    ctx.obj = State(workspace)
    private_umask(ctx.obj)  # before anything is written
    before = catalog_signature(ctx.obj)
    ctx.call_on_close(lambda: backup_after(ctx.obj, before))


def private_umask(state: State) -> None:
    """A private workspace (``workspace.private``, ``$HISTCODE_PRIVATE``): this process's umask becomes 077, so that
    every file and folder the command creates is owner-only. Only the command sets it (library code holds no
    global state); a params.yaml that does not load is left for the command to report."""
    import os

    from histcode.config import ConfigError
    from histcode.workspace import PRIVATE_UMASK, Workspace, wants_private

    try:
        cfg = Workspace.resolve(state.workspace).config()
    except (ConfigError, OSError, ValueError):
        cfg = None  # $HISTCODE_PRIVATE still holds
    if wants_private(cfg):
        os.umask(PRIVATE_UMASK)


def workspace_of(ctx: typer.Context):
    """The invocation's workspace (``--workspace``, else $HISTCODE_HOME, else the repository), created."""
    from histcode.workspace import Workspace

    return Workspace.resolve(ctx.obj.workspace if ctx.obj else None).ensure()


def config_of(ws):
    from histcode.config import ConfigError

    try:
        return ws.config()
    except ConfigError as exc:
        fail(str(exc))


def fail(message: str, code: int = 2) -> NoReturn:
    from rich.console import Console
    from rich.markup import escape

    # escaped: a message naming an extra ('histcode[viewer]') or a list is text, not markup
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def named_paths(pairs: list[str] | None, option: str, example: str) -> dict[str, Path]:
    """``NAME=PATH`` option values (``--weights``, ``--slide-weights``) as name -> path; a malformed one fails
    naming the option and an example."""
    out = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path:
            fail(f"{option} takes NAME=PATH (e.g. {example}), not {pair!r}")
        out[name.strip()] = Path(path).expanduser()
    return out


def terminal():
    from rich.console import Console

    return Console()


def print_frame(table, output: str, limit: int, render) -> None:
    """An Arrow table as a terminal table (``render(table, limit)``), CSV or JSON lines on stdout."""
    if output == "csv":
        sys.stdout.write(table.to_pandas().to_csv(index=False))
    elif output == "json":
        sys.stdout.write(table.to_pandas().to_json(orient="records", lines=True, double_precision=6))
    elif output == "table":
        terminal().print(render(table, limit))
    else:
        fail(f"--format must be table, csv or json, not {output!r}")


def slide_sources(paths, manifest, mpp, extensions) -> list:
    """The slides a command was given: a manifest's rows, then files and folders; exits 2 when there are none."""
    from histcode.ingest.sources import ManifestError, read_manifest, sources_from_paths

    if not paths and manifest is None:
        fail("give slide paths or --manifest CSV")
    try:
        sources = read_manifest(manifest, mpp) if manifest else []
    except ManifestError as exc:
        fail(str(exc))
    sources += sources_from_paths(list(paths or []), extensions, mpp)
    if not sources:
        fail("no slide files found in the given paths")
    return sources
