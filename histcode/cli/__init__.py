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

from histcode.cli import cohorts, common, encoders, features, heads, labels, services, slides

HELP = "HistCode: whole-slide images -> tiles -> contrastive embeddings -> heads, as a feature store."


def build_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)
    app.callback()(common.main_options)
    for module in (slides, features, heads, services):
        for name, command in module.COMMANDS:
            app.command(name)(command)
    for name, module in (("labels", labels), ("cohorts", cohorts), ("encoders", encoders)):
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
