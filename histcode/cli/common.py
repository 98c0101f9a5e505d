"""What every `histcode` command shares: the global options, the workspace and config of the invocation,
errors, the console and table/CSV/JSON output. Command modules import this; nothing here imports them."""

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


def main_options(
    ctx: typer.Context,
    workspace: Annotated[Optional[Path], typer.Option("--workspace", "-w", help="Workspace directory (default: $HISTCODE_HOME, else the repository root).")] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging (-vv for debug).")] = 0,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print HistCode's version and exit.")] = False,
) -> None:
    setup_logging(verbose)
    ctx.obj = State(workspace)


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
