"""`histcode` commands for slides: the demo cohort, ingest, tiling, the catalog, the whole demo, the local servers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histcode.apps.done_stamp import fingerprint, read_stamp, write_stamp
from histcode.cli.common import config_of, fail, print_frame, slide_sources, terminal, workspace_of


def demo_data(
    ctx: typer.Context,
    force: Annotated[bool, typer.Option(help="Rebuild even if an identical cohort is present.")] = False,
    workers: Annotated[int, typer.Option(help="Slide-writing processes.")] = 2,
) -> None:
    """Build the demo cohort (real LC25000 tiles, simulated layout, labels and expression) under data/demo."""
    from histcode.demo.build import build_demo_cohort
    from histcode.demo.plan import DemoSourceError

    ws = workspace_of(ctx)
    cfg = config_of(ws).demo
    source = ws.path(cfg.source_dir) if cfg.source_dir else None
    try:
        cohort = build_demo_cohort(cfg, ws.path(cfg.out_dir), source, force=force, workers=workers)
    except (DemoSourceError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    state = "built" if cohort.built else "up to date"
    terminal().print(f"demo cohort {state}: {cohort.n_patients} patients, {cohort.n_slides} slides in {cohort.out_dir}")


def ingest(
    ctx: typer.Context,
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Slide files or folders of slides.")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="CSV with path[, slide_id, patient_id, mpp, cohort].")] = None,
    mpp: Annotated[Optional[float], typer.Option(help="Microns per pixel for slides whose files carry no usable scale.")] = None,
    cohort: Annotated[Optional[str], typer.Option(help="Training cohort to register the slides in (default: ingest.cohort).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/ingest.json).")] = None,
    gdc: Annotated[Optional[Path], typer.Option(help="A GDC download folder (gdc-client's DIR/<file UUID>/<barcode>.<uuid>.svs): slide ids are the slide barcodes.")] = None,
    gdc_sheet: Annotated[Optional[Path], typer.Option(help="With --gdc: the GDC sample sheet or gdc_manifest.txt of the slides (default: every slide below DIR).")] = None,
    slide_type: Annotated[Optional[str], typer.Option(help="With --gdc: dx (FFPE diagnostic), frozen (TS/BS/MS sections) or all (default ingest.gdc_slide_type).")] = None,
) -> None:
    """Register slides in a cohort of the catalog. Exits 1 if any slide failed (the others are registered)."""
    from histcode.ingest.gdc import ingest_gdc
    from histcode.ingest.run import ingest_sources
    from histcode.ingest.sources import ManifestError
    from histcode.reports import ingest_summary
    from histcode.store.files import write_json
    from histcode.store.catalog import Catalog, CatalogError
    from histcode.views import ingest_table

    ws = workspace_of(ctx)
    cfg = config_of(ws)
    if gdc is not None:
        if paths or manifest:
            fail("--gdc takes the slides of a GDC download: give no slide paths or --manifest with it")
        try:  # the manifest's sizes and md5s are checked first: a slide whose file differs is reported failed
            result = ingest_gdc(gdc, gdc_sheet, Catalog.of(ws), cfg.ingest, slide_type, mpp, cohort)
        except (ManifestError, CatalogError) as exc:
            fail(str(exc))
    elif gdc_sheet or slide_type:
        fail("--gdc-sheet and --slide-type go with --gdc DIR")
    else:
        sources = slide_sources(paths, manifest, mpp, cfg.ingest.extensions)
        try:
            result = ingest_sources(sources, Catalog.of(ws), cfg.ingest, cohort=cohort)
        except CatalogError as exc:
            fail(str(exc))
    terminal().print(ingest_table(result))
    summary = ingest_summary(result)
    write_json(report or ws.metrics_dir / "ingest.json", summary)
    if result.failed:
        terminal().print(f"[yellow]{len(result.failed)} of {len(result.outcomes)} slides failed; see the reasons above.[/]")
        raise typer.Exit(1)


def tile(
    ctx: typer.Context,
    slide: Annotated[Optional[list[str]], typer.Option("--slide", help="Only these slide ids (repeatable).")] = None,
    force: Annotated[bool, typer.Option(help="Re-tile slides already tiled under this spec.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Retry slides whose last tiling failed.")] = False,
    workers: Annotated[Optional[int], typer.Option(help="Slide processes (default: tiling.workers).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write a JSON summary here (default: metrics/tiling.json).")] = None,
) -> None:
    """Detect tissue and place the tile grid on every ingested slide. Exits 1 if any slide failed."""
    from histcode.reports import tiling_summary
    from histcode.store.files import write_json
    from histcode.store.catalog import Catalog, CatalogError
    from histcode.tiling.run import tile_slides
    from histcode.views import tiling_table

    ws = workspace_of(ctx)
    cfg = config_of(ws).tiling
    if workers is not None:
        cfg = cfg.model_copy(update={"workers": workers})
    catalog = Catalog.of(ws)
    if not catalog.path.exists():
        fail(f"no catalog at {catalog.path}: run `histcode ingest` first")
    try:
        result = tile_slides(catalog, cfg, ws.outputs_dir / "qc", slide_ids=slide, force=force, retry_failed=retry_failed)
    except CatalogError as exc:
        fail(str(exc))
    terminal().print(tiling_table(result))
    write_json(report or ws.metrics_dir / "tiling.json", tiling_summary(result))
    terminal().print(f"QC pictures: {ws.outputs_dir / 'qc' / result.spec_id}")
    if result.failed:
        raise typer.Exit(1)


def slides(
    ctx: typer.Context,
    status: Annotated[Optional[str], typer.Option(help="Only slides with this status (ok, failed).")] = None,
    output: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
    wide: Annotated[bool, typer.Option("--wide", help="Show long ids and reasons whole (cells wrap).")] = False,
    limit: Annotated[int, typer.Option(help="Rows to print in table format.")] = 1000,
) -> None:
    """List the slides in the catalog: cohort, status, scale, tiles, failure reason."""
    from histcode.store.catalog import Catalog, CatalogError
    from histcode.views import arrow_table, slides_frame

    ws = workspace_of(ctx)
    catalog = Catalog.of(ws)
    try:
        frame = slides_frame(catalog, status)
    except CatalogError as exc:
        fail(str(exc))
    brief = ["slide_id", "cohort", "status", "tiles", "mpp", "reason"]
    title = f"{frame.num_rows} slides in {catalog.path.relative_to(ws.root) if catalog.path.is_relative_to(ws.root) else catalog.path}"
    print_frame(frame, output, limit, lambda t, n: arrow_table(t, n, wide, title, columns=brief))


def demo(
    ctx: typer.Context,
    workers: Annotated[int, typer.Option(help="Processes for writing the demo slides.")] = 2,
    recheck: Annotated[bool, typer.Option("--recheck", help="Ask every stage whether it is done, even when the "
                                          "workspace is exactly as a complete demo run left it.")] = False,
) -> None:
    """Run the whole pipeline on the demo cohort with the workspace's params.yaml. A workspace exactly as a
    complete run left it (same params, code and stores) is reported up to date without opening anything."""
    ws = workspace_of(ctx)
    cfg = config_of(ws)
    console = terminal()
    local = ws.mlflow_is_local and ws.lancedb_is_local  # remote stores: their state is unseen
    stamp = None if recheck or not local else read_stamp(ws.root, _demo_fingerprint(ws, cfg))
    if stamp is not None:
        console.print(f"[bold]Up to date[/]: params, code, slides and stores are as the complete demo run of "
                      f"{stamp['finished']} left them; nothing to do (`histcode demo --recheck` asks every stage). "
                      "Its summary:", soft_wrap=True)
        console.print(stamp["summary"], soft_wrap=True)
        return
    from histcode.apps.demo import run_demo
    from histcode.tracking import telemetry_off
    from histcode.views import ingest_table, next_steps, tiling_table

    telemetry_off()
    outcome = run_demo(ws, cfg, workers=workers)
    if outcome.ingest.failed:
        console.print(ingest_table(outcome.ingest))
    console.print(tiling_table(outcome.tiling))
    summary = next_steps(ws, outcome)
    console.print(summary, soft_wrap=True)
    if outcome.failed:
        raise typer.Exit(1)
    if local:
        write_stamp(ws.root, _demo_fingerprint(ws, cfg), summary)  # after the run's last write


def _demo_fingerprint(ws, cfg) -> str:
    """``histcode.apps.done_stamp.fingerprint`` of the workspace with its config, the inputs the config names and
    where its stores are."""
    from histcode.workspace import bundled_source_dir

    inputs = [ws.path(cfg.demo.out_dir), ws.path(cfg.labels.expression)]
    for source in (cfg.demo.source_dir, cfg.pretrain.probe.source_dir):
        try:
            inputs.append(ws.path(source) if source else bundled_source_dir())
        except FileNotFoundError:
            pass  # no bundled tiles: the demo itself says what is missing
    return fingerprint(ws.root, cfg.model_dump(mode="json"), inputs,
                       {"mlflow": ws.mlflow_uri, "lancedb": ws.lancedb_uri})


COMMANDS = (
    ("demo-data", demo_data),
    ("ingest", ingest),
    ("tile", tile),
    ("slides", slides),
    ("demo", demo),
)
