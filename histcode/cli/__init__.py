"""The `histcode` command (also `python -m histcode` and `python -m histcode.cli`).

Commands live in one module per group (slides, features, heads, services; the subcommand groups labels,
cohorts and encoders), each listing its commands in
``COMMANDS``; this module builds the app from those lists explicitly, so nothing registers itself on import and
no command module imports this one. Heavy libraries are imported inside the commands, so `histcode --help`
answers at once. Each DVC stage is one command.
"""

from __future__ import annotations

import sys

import typer

from histcode.cli import cohorts, common, doctor, encoders, features, heads, labels, services, slides, stack
from histcode.cli import workspace as workspace_commands
from histcode.cli.exchange import EXPORT, IMPORT

HELP = "HistCode: whole-slide images -> tiles -> contrastive embeddings -> heads, as a feature store."


def build_app() -> typer.Typer:
    # plain tracebacks: typer's own would print before `main` can tell a service outage in one line
    app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, pretty_exceptions_enable=False)
    app.callback()(common.main_options)
    for module in (slides, features, heads, services, doctor):
        for name, command in module.COMMANDS:
            app.command(name)(command)
    for name, module in (("labels", labels), ("cohorts", cohorts), ("encoders", encoders),
                         ("services", stack), ("import", IMPORT), ("export", EXPORT),
                         ("workspace", workspace_commands)):
        group = typer.Typer(no_args_is_help=True, help=module.HELP)
        for command_name, command in module.COMMANDS:
            group.command(command_name)(command)
        app.add_typer(group, name=name)
    return app


app = build_app()


def _terminate(signum, frame) -> None:  # noqa: ANN001 -- signal handler signature
    raise KeyboardInterrupt  # unwinds like Ctrl-C: open MLflow runs end KILLED, transactions roll back


def main() -> None:
    import signal

    from histcode.runtime import limit_malloc_arenas

    limit_malloc_arenas()  # before any store is read: see its docstring
    signal.signal(signal.SIGTERM, _terminate)  # `kill PID`, a scheduler's cancel: end cleanly, not mid-write
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 -- a service outage, a fault of the machine and HistCode's own errors are told in one line; anything else keeps its traceback
        from rich.console import Console
        from rich.markup import escape

        told = common.told_error(exc)  # e.g. the catalog in use, an unknown view, a full disk
        if told is None:
            raise
        Console(stderr=True).print(f"[bold red]error:[/] {escape(told[0])}", soft_wrap=True)
        sys.exit(told[1])
