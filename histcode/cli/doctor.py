"""`histcode doctor`: the pre-flight check (histcode.doctor) as a table, or JSON; exit 1 when anything failed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from histcode.cli.common import fail, named_paths

STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def _weights(pairs: list[str]) -> dict[str, Path]:
    return named_paths(pairs, "--weights", "uni=/models/uni/pytorch_model.bin")


def doctor(
    ctx: typer.Context,
    slides: Annotated[Optional[list[Path]], typer.Option("--slides", help="Slide files or folders to check before ingest (instead of a sample of the catalog's).")] = None,
    sample: Annotated[int, typer.Option("--sample", min=0, help="Catalog slides to open and check (spread over the cohort).")] = 5,
    mpp: Annotated[Optional[float], typer.Option("--mpp", help="um/px for --slides files that carry no scale, as `histcode ingest --mpp`.")] = None,
    weights: Annotated[Optional[list[str]], typer.Option("--weights", help="NAME=PATH: a foundation encoder's weight file (or Hugging Face cache folder) to check; repeatable.")] = None,
    area: Annotated[Optional[list[str]], typer.Option("--area", help="Only these areas: environment, stores, encoders, slides, exposure (repeatable).")] = None,
    output: Annotated[str, typer.Option("--format", help="table or json")] = "table",
    all_rows: Annotated[bool, typer.Option("--all", help="Show the checks that passed too (the table shows problems and a count of passes).")] = False,
) -> None:
    """Check the machine, the workspace's stores, the encoders' weights and a sample of slides before a long run.

    Prints what is wrong and how to fix it; exits 1 if any check failed (warnings alone exit 0). Reads only:
    nothing in the workspace is written.
    """
    import json
    import sys

    from histcode.config import ConfigError
    from histcode.doctor import AREAS, DoctorOptions, failed, run_doctor
    from histcode.workspace import Workspace

    if output not in ("table", "json"):
        fail(f"--format must be table or json, not {output!r}")
    ws = Workspace.resolve(ctx.obj.workspace if ctx.obj else None)  # not ensure(): doctor creates nothing
    try:
        cfg = ws.config()
    except ConfigError as exc:
        fail(f"params.yaml: {exc}", code=1)
    options = DoctorOptions(sample=sample, slide_paths=tuple(slides or ()), mpp=mpp, weights=_weights(weights or []),
                            areas=tuple(area) if area else AREAS)
    findings = run_doctor(ws, cfg, options)
    if output == "json":
        sys.stdout.write(json.dumps([f.as_dict() for f in findings], indent=1) + "\n")
    else:
        _print_table(ws, findings, all_rows)
    if failed(findings):
        raise typer.Exit(1)


def _print_table(ws, findings, all_rows: bool) -> None:
    """One block per finding (a status, the area and item, what was found, how to fix it): messages are long, so
    they wrap under their item rather than in a narrow table column."""
    from rich.markup import escape

    from histcode.cli.common import terminal

    console = terminal()
    console.print(f"histcode doctor: workspace {escape(str(ws.root))}")
    for f in findings:
        if f.status == "ok" and not all_rows:
            continue
        console.print(f"[{STYLE[f.status]}]{f.status.upper():4}[/] [bold]{f.area}[/]: {escape(f.item)}", soft_wrap=True)
        console.print(f"      {escape(f.detail)}", soft_wrap=True)
        if f.fix:
            console.print(f"      fix: {escape(f.fix)}", soft_wrap=True)
    counts = {s: sum(f.status == s for f in findings) for s in ("ok", "warn", "fail")}
    console.print(f"{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failure(s)"
                  + ("" if all_rows or not counts["ok"] else " (--all shows the checks that passed)"))


COMMANDS = (("doctor", doctor),)
