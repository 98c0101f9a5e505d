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

    from histcode.apps.encoders import catalogue, registered_encoders, slide_catalogue

    ws = workspace_of(ctx)
    entries, versions, slides = catalogue(), registered_encoders(ws, config_of(ws)), slide_catalogue()
    if output == "json":
        sys.stdout.write(json.dumps({"foundation": entries, "slide": slides, "registered": versions}, indent=1) + "\n")
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
    slide_table = Table(title="slide encoders (`histcode encoders embed-slides NAME --view TILE_VIEW --weights PATH`)")
    for column in ("name", "reads", "dim", "tile pitch", "weights", "licence", "status"):
        slide_table.add_column(column, overflow="fold")
    for e in slides:
        pitch = f"{e['patch_um']:.4g} um" if e["patch_um"] else "unused"
        slide_table.add_row(e["name"], f"{e['tile_encoder']} ({e['in_dim']}-d)", str(e["dim"]), pitch,
                            " | ".join(e["weight_files"]), e["licence"], "refused: " + e["refused"] if e["refused"] else "built here")
    console.print(slide_table)
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
    allow_other_weights: Annotated[bool, typer.Option("--allow-other-weights", help="Register weights whose sha256 differs from the published file's (e.g. a fine-tuned copy); the version is tagged weights_check=override.")] = False,
) -> None:
    """Load a foundation encoder's published weights from this machine (nothing is downloaded) and register it as
    a version of the encoder model, so `histcode embed --encoder histcode-encoder@NAME` makes its feature view."""
    from rich.markup import escape

    from histcode.apps.encoders import register_foundation
    from histcode.ssl.encoders import EncoderError
    from histcode.tracking import telemetry_off

    telemetry_off()
    ws = workspace_of(ctx)
    try:
        result = register_foundation(ws, config_of(ws), name, weights, mpp=mpp, alias=alias, force=force,
                                     stain_norm=stain_norm, allow_other_weights=allow_other_weights)
    except EncoderError as exc:
        fail(str(exc))
    console = terminal()
    if result.weights_check != "verified":
        console.print(f"[yellow]warning:[/] {escape(result.weights_note)}", soft_wrap=True)
    verb = "already registered as" if result.reused else "registered as"
    console.print(f"{result.name} ({result.weights}, sha256 {result.sha256[:12]}) {verb} {result.model_name} version "
                  f"{result.version}, alias {result.alias}; tiles are read at {result.mpp:.3g} um/px")
    console.print(f"next: `histcode embed --encoder {result.ref}`")


def encoders_embed_slides(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A slide encoder (see `histcode encoders list`).")],
    weights: Annotated[Path, typer.Option(help="The published weight file, a folder holding it, or a Hugging Face cache folder.")],
    view: Annotated[Optional[str], typer.Option(help="The tile view to read (default: features.encoder's view); it must be the slide encoder's tile encoder's.")] = None,
    slide: Annotated[Optional[list[str]], typer.Option("--slide", help="Only these slides (repeatable).")] = None,
    output: Annotated[str, typer.Option("--format", help="table | json")] = "table",
) -> None:
    """Encode each slide of a tile view with a published slide encoder (weights from this machine; nothing is
    downloaded) into a new slide-level view, which `histcode search --slide`, `histcode heads --view` and the
    viewer read like pooled slide vectors. Reruns encode only slides not done yet."""
    from histcode.apps.encoders import embed_with_slide_encoder
    from histcode.features.registry import ViewError
    from histcode.features.slide_embed import describe_report
    from histcode.ssl.encoders import EncoderError
    from histcode.store.vectors import VectorStoreError

    ws = workspace_of(ctx)
    try:
        report = embed_with_slide_encoder(ws, config_of(ws), name, weights, view=view, slide_ids=slide)
    except (EncoderError, ViewError, VectorStoreError) as exc:
        fail(str(exc))
    if output == "json":
        sys.stdout.write(json.dumps(describe_report(report)) + "\n")
    else:
        console = terminal()
        console.print(f"{report.encoder} over view {report.source.view_id}: view {report.view.view_id} "
                      f"({report.view.dim}-d): {report.count('embedded')} slides encoded, {report.count('skipped')} "
                      f"already done, {len(report.failed)} failed")
        for o in report.failed:
            console.print(f"  {o.slide_id}: {o.reason}")
        console.print(f"next: `histcode search --slide ID --view {report.view.view_id}`")
    if report.failed:
        raise typer.Exit(1)


HELP = "Foundation encoders: the registry, registering one from local weights, and slide encoders over a tile view."

COMMANDS = (
    ("list", encoders_list),
    ("register", encoders_register),
    ("embed-slides", encoders_embed_slides),
)
