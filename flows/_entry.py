"""Command lines for the flows, built from each flow's typed parameters (``python -m flows.X --help``)."""

from __future__ import annotations

import argparse
import inspect


def run_flow_from_argv(flow, argv: list[str] | None = None):
    """Parse ``--option value`` pairs named after the flow's parameters and run the flow with them:
    ``bool`` parameters become ``--x/--no-x``, ``list`` parameters take several values."""
    fn = flow.fn
    parser = argparse.ArgumentParser(prog=f"python -m flows.{fn.__module__.split('.')[-1]}", description=fn.__doc__)
    for name, param in inspect.signature(fn).parameters.items():
        flag = "--" + name.replace("_", "-")
        kind = str(param.annotation)
        if "bool" in kind:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=param.default)
        elif "list" in kind:
            parser.add_argument(flag, dest=name, nargs="*", default=param.default)
        else:
            convert = int if "int" in kind else float if "float" in kind else str
            parser.add_argument(flag, dest=name, type=convert, default=param.default)
    from histcode.runtime import limit_malloc_arenas

    limit_malloc_arenas()  # as the CLI does, before any store is read
    return flow(**vars(parser.parse_args(argv)))
