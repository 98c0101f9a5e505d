"""`histcode encoders ...`: the pathology foundation encoders HistCode knows, and registering one from local weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from histcode.cli.common import config_of, fail, terminal, workspace_of


def encoders_list(
    ctx: typer.Context,
    output: Annotated[str, typer.Option("--format", help="table | json")] = "table",
) -> None:
    """The foundation encoder registry (architecture, input, um/px, pooling, licence, model card) and the encoder
    versions registered in this workspace, trained here or from foundation weights."""
    from rich.table import Table

    from histcode.apps.encoders import catalogue, registered_encoders

    ws = workspace_of(ctx)
    entries, versions = catalogue(), registered_encoders(ws, config_of(ws))
    if output == "json":
        sys.stdout.write(json.dumps({"foundation": entries, "registered": versions}, indent=1) + "\n")
        return
    if output != "table":
        fail(f"--format must be table or json, not {output!r}")
    table = Table(title="foundation encoders (weights from their authors; `histcode encoders register NAME --weights PATH`)")
    for column in ("name", "architecture", "dim", "input", "um/px", "pooling", "weights", "licence", "card"):
        table.add_column(column, overflow="fold")
    for e in entries:
        table.add_row(e["name"], f"{e['architecture']} ({e['params_m']:.0f}M)", str(e["dim"]), f"{e['input_px']} px",
                      f"{e['mpp']:.3g}", e["pooling"], " | ".join(e["weight_files"]) + f" ({e['key_layout']} keys)",
                      e["licence"], e["card"])
    console = terminal()
    console.print(table)
    mine = Table(title=f"registered encoder versions in {ws.root}")
    for column in ("model", "version", "aliases", "encoder", "method", "dim", "image_px", "mpp"):
        mine.add_column(column)
    for row in versions:
        mine.add_row(*(str(row[c]) for c in ("model", "version", "aliases", "encoder", "method", "dim", "image_px", "mpp")))
    console.print(mine if versions else "no encoder registered in this workspace yet")


def encoders_register(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A registry name (see `histcode encoders list`).")],
    weights: Annotated[Path, typer.Option(help="The published weight file, a folder holding it, or a Hugging Face cache folder.")],
    mpp: Annotated[Optional[float], typer.Option(help="Microns per pixel to read tiles at (default: the entry's).")] = None,
    alias: Annotated[Optional[str], typer.Option(help="Registry alias (default: the entry's name).")] = None,
    force: Annotated[bool, typer.Option(help="Register a new version even if these weights are registered already.")] = False,
    stain_norm: Annotated[bool, typer.Option("--stain-norm", help="Read slide tiles through pretrain.stain_norm, as the encoders trained here do (for an ablation that compares encoders alone); default: as they are, as the encoder was published.")] = False,
) -> None:
    """Load a foundation encoder's published weights from this machine (nothing is downloaded) and register it as
    a version of the encoder model, so `histcode embed --encoder histcode-encoder@NAME` makes its feature view."""
    from histcode.apps.encoders import register_foundation
    from histcode.ssl.encoders import EncoderError
    from histcode.tracking import telemetry_off

    telemetry_off()
    ws = workspace_of(ctx)
    try:
        result = register_foundation(ws, config_of(ws), name, weights, mpp=mpp, alias=alias, force=force,
                                     stain_norm=stain_norm)
    except EncoderError as exc:
        fail(str(exc))
    console = terminal()
    verb = "already registered as" if result.reused else "registered as"
    console.print(f"{result.name} ({result.weights}, sha256 {result.sha256[:12]}) {verb} {result.model_name} version "
                  f"{result.version}, alias {result.alias}; tiles are read at {result.mpp:.3g} um/px")
    console.print(f"next: `histcode embed --encoder {result.ref}`")


HELP = "Foundation encoders: the registry, and registering one from local weights."

COMMANDS = (
    ("list", encoders_list),
    ("register", encoders_register),
)
