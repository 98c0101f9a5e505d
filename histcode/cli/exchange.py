"""`histcode import ...` and `histcode export ...`: other tools' files in (TRIDENT / CLAM feature files) and a
view's tiles out (QuPath GeoJSON, AnnData .h5ad, TRIDENT-layout .h5). Two command groups in one module:
``IMPORT`` and ``EXPORT``, each with its ``HELP`` and ``COMMANDS`` as the other groups' modules have."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Optional

import typer

from histcode.cli.common import config_of, fail, terminal, workspace_of


def _import(ctx: typer.Context, tool: str, folder: Path, encoder: str | None, clam=None) -> None:
    from rich.table import Table

    from histcode.errors import HistcodeError
    from histcode.exchange.importing import import_features
    from histcode.tracking import telemetry_off

    telemetry_off()
    ws = workspace_of(ctx)
    cfg = config_of(ws)
    try:
        report = import_features(ws, cfg, tool, folder, encoder=encoder, clam=clam)
    except HistcodeError as exc:
        fail(str(exc))
    v = report.view
    title = (f"import {tool} {folder}: view {v.view_id} ({v.model_name}, {v.dim}-d, spec {v.spec_id}): " if v else
             f"import {tool} {folder}: no view (no file could be imported): ")
    table = Table(title=title + f"{report.count('imported')} imported, {report.count('skipped')} unchanged, "
                                f"{len(report.failed)} failed")
    for col in ("file", "slide_id", "action", "tiles", "reason"):
        table.add_column(col, overflow="fold")
    for o in report.outcomes:
        style = "red" if o.action == "failed" else "green" if o.action == "imported" else "white"
        table.add_row(o.file, o.slide_id or "", f"[{style}]{o.action}[/]", str(o.rows or ""), o.reason or "")
    if report.maintenance:
        table.caption = "; ".join(report.maintenance)
    terminal().print(table)
    if v:
        typer.echo(f"use it with --view {v.view_id} (histcode search / heads / export)", err=True)
    if report.failed:
        raise typer.Exit(1)


def import_trident(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="A TRIDENT features_<encoder> folder, or a job / coords folder holding one.")],
    encoder: Annotated[Optional[str], typer.Option(help="Pick features_NAME among several; must match the files' encoder attribute.")] = None,
) -> None:
    """Import TRIDENT patch features (features_<encoder>/<slide>.h5) as a feature view of the ingested slides.
    Exits 1 if a file could not be imported (each is listed with the reason)."""
    _import(ctx, "trident", folder, encoder)


def import_clam(
    ctx: typer.Context,
    folder: Annotated[Path, typer.Argument(help="CLAM's feature folder (holding h5_files/) or the h5_files folder.")],
    encoder: Annotated[str, typer.Option(help="The --model_name CLAM extracted with (its files do not say).")] = "resnet50_trunc",
    patches: Annotated[Optional[Path], typer.Option(help="CLAM's patches folder (patches/<slide>.h5 carry patch_size and patch_level).")] = None,
    patch_size: Annotated[Optional[int], typer.Option(help="Patch side in pixels at --patch-level, where no patch file says.")] = None,
    patch_level: Annotated[Optional[int], typer.Option(help="Pyramid level the patches were read at, where no patch file says.")] = None,
) -> None:
    """Import CLAM patch features (h5_files/<slide>.h5) as a feature view of the ingested slides. Exits 1 if a
    file could not be imported (each is listed with the reason)."""
    from histcode.exchange.patches import ClamGrid

    _import(ctx, "clam", folder, encoder, ClamGrid(patches, patch_size, patch_level))


def _view(ws, cfg, view_id: str | None):
    from histcode.errors import HistcodeError
    from histcode.features.registry import resolve_view
    from histcode.store.catalog import Catalog
    from histcode.tracking import Tracker

    try:
        return resolve_view(Catalog.of(ws), Tracker(ws), cfg, view_id)
    except HistcodeError as exc:
        fail(str(exc))


def export_geojson(
    ctx: typer.Context,
    slide: Annotated[str, typer.Argument(help="Slide id.")],
    view: Annotated[Optional[str], typer.Option(help="Feature view id (default: features.encoder's view).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="The .geojson file (default: outputs/exchange/<slide>.geojson).")] = None,
    object_type: Annotated[str, typer.Option("--object-type", help="QuPath object type: tile or detection.")] = "tile",
    heads: Annotated[bool, typer.Option(help="Add scores of the registered heads that read this view.")] = True,
) -> None:
    """A slide's tiles as QuPath GeoJSON (level-0 pixel squares with their scores as measurements)."""
    from histcode.errors import HistcodeError
    from histcode.exchange.geojson import export_geojson as run
    from histcode.tracking import telemetry_off

    telemetry_off()
    ws = workspace_of(ctx)
    cfg = config_of(ws)
    fv = _view(ws, cfg, view)
    try:
        result = run(ws, cfg, slide, fv, out, object_type, heads)
    except HistcodeError as exc:
        fail(str(exc))
    terminal().print(f"{result.tiles} tiles of {slide} (view {fv.view_id}) -> {result.path}; measurements: "
                     f"{', '.join(result.measurements) or 'none'}; {result.classified} classified")


def _export_view(ctx: typer.Context, view: str, run, *args):
    """The view, and ``run(ws, view, *args)``'s result (HistcodeError reaches the command line's one-line report)."""
    ws = workspace_of(ctx)
    fv = _view(ws, config_of(ws), view)
    return fv, run(ws, fv, *args)


def export_anndata(
    ctx: typer.Context,
    view: Annotated[str, typer.Argument(help="Feature view id.")],
    out: Annotated[Optional[Path], typer.Option(help="The .h5ad file (default: outputs/exchange/<view>.h5ad).")] = None,
    slide: Annotated[Optional[list[str]], typer.Option("--slide", help="Only these slide ids (repeatable).")] = None,
) -> None:
    """A view's tiles as an AnnData .h5ad: vectors as X, tiles as obs, centres in obsm['spatial']."""
    from histcode.exchange.h5ad import export_anndata as run

    fv, path = _export_view(ctx, view, run, out, slide)
    terminal().print(f"view {fv.view_id} ({fv.model_name}, {fv.dim}-d) -> {path}")


def export_h5(
    ctx: typer.Context,
    view: Annotated[str, typer.Argument(help="Feature view id.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder (default: outputs/exchange/h5/<view>); files go to <mag>x_<px>px_<overlap>px_overlap/features_<encoder>/.")] = None,
    slide: Annotated[Optional[list[str]], typer.Option("--slide", help="Only these slide ids (repeatable).")] = None,
) -> None:
    """A view's tiles as TRIDENT-layout .h5 files, one per slide (features, coords and TRIDENT's attributes)."""
    from histcode.exchange.export_h5 import export_h5 as run

    fv, result = _export_view(ctx, view, run, out, slide)
    terminal().print(f"view {fv.view_id}: {len(result.files)} slides, {result.tiles} tiles -> {result.folder}")


IMPORT = SimpleNamespace(
    HELP="Import other tools' features (TRIDENT, CLAM .h5 files) as feature views of ingested slides.",
    COMMANDS=(("trident", import_trident), ("clam", import_clam)),
)
EXPORT = SimpleNamespace(
    HELP="Export a view's tiles for other tools: QuPath GeoJSON, AnnData .h5ad, TRIDENT-layout .h5.",
    COMMANDS=(("geojson", export_geojson), ("anndata", export_anndata), ("h5", export_h5)),
)
