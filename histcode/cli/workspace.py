"""`histcode workspace ...`: who may read the workspace (making an existing one private)."""

from __future__ import annotations

import typer

from histcode.cli.common import fail, terminal


def workspace_secure(ctx: typer.Context) -> None:
    """Make this workspace owner-only: its folder and every folder of its stores 0700, every file 0600, so that
    other users of a shared host cannot read patient ids, labels or models. Prints what it changed. Keep new
    files private with `workspace.private: true` in params.yaml (or $HISTCODE_PRIVATE=1)."""
    import logging

    from rich.markup import escape

    from histcode.workspace import Workspace, secure_workspace, wants_private

    log = logging.getLogger(__name__)
    ws = Workspace.resolve(ctx.obj.workspace if ctx.obj else None)  # not ensure(): nothing is created
    if not ws.root.is_dir():
        fail(f"no workspace at {ws.root}: nothing to secure")
    report = secure_workspace(ws)
    console = terminal()
    for path, before, after in report.changed:
        log.debug("%s: %o -> %o", path, before, after)
    console.print(f"{escape(str(ws.root))}: {len(report.changed)} of {report.looked_at} files and folders made "
                  "owner-only (folders 0700, files 0600)", soft_wrap=True)
    for path, before, after in report.changed[:10]:
        console.print(f"  {escape(str(path))}: {before:04o} -> {after:04o}", soft_wrap=True)
    if len(report.changed) > 10:
        console.print(f"  ... and {len(report.changed) - 10} more (-vv lists them all)")
    for path, why in report.failed:
        console.print(f"[yellow]not changed:[/] {escape(str(path))}: {escape(why)}", soft_wrap=True)
    try:
        private = wants_private(ws.config())
    except Exception:  # noqa: BLE001 -- a params.yaml that does not load is doctor's to report
        private = wants_private(None)
    if not private:
        console.print("new files follow the umask: set `workspace.private: true` in params.yaml (or "
                      "HISTCODE_PRIVATE=1) so that they are owner-only too")
    if report.failed:
        raise typer.Exit(1)


HELP = "The workspace itself: make it private (owner-only) on a shared host."

COMMANDS = (("secure", workspace_secure),)
