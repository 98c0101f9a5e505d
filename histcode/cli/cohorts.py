"""`histcode cohorts ...`: the named cohorts of the catalog (training or inference) and moving slides between
them (for example slides a pre-cohort `histcode predict` registered, which an upgrade puts in `default`)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from histcode.cli.common import fail, print_frame, terminal, workspace_of

HELP = "Cohorts: which slides train (training cohorts) and which are only predicted (inference cohorts)."


def list_cohorts(
    ctx: typer.Context,
    output: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
) -> None:
    """Every cohort with its role and how many slides it holds (ok of all)."""
    import pyarrow as pa

    from histcode.store.catalog import Catalog
    from histcode.views import arrow_table

    rows = Catalog.of(workspace_of(ctx)).cohort_counts()
    table = pa.Table.from_pylist(rows) if rows else pa.table({"cohort": pa.array([], pa.string())})
    print_frame(table, output, 1000, lambda t, n: arrow_table(t, n))


def move(
    ctx: typer.Context,
    slides: Annotated[list[str], typer.Argument(help="Slide ids to move.")],
    to: Annotated[str, typer.Option("--to", help="The cohort to put them in.")],
    role: Annotated[Optional[str], typer.Option(help="training | inference: the role of a new cohort (default training).")] = None,
) -> None:
    """Move registered slides to another cohort (tiles and vectors stay; training reads them by cohort)."""
    from histcode.store.catalog import Catalog, CatalogError

    if role not in (None, "training", "inference"):
        fail(f"--role must be training or inference, not {role!r}")
    try:
        Catalog.of(workspace_of(ctx)).move_slides(slides, to, role)
    except CatalogError as exc:
        fail(str(exc))
    terminal().print(f"{len(slides)} slides now in cohort {to!r}")


COMMANDS = (
    ("list", list_cohorts),
    ("move", move),
)
