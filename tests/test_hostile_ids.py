"""Slide ids are the user's accessions, whatever they hold; no id makes HistCode write outside the workspace.

Ids that climb out of a folder, absolute paths, quotes (SQL, MLflow filters), mathtext, other scripts and
300 characters go through ingest, tiling (QC pictures), embedding, prediction, heatmaps, SQL and search."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from histcode.apps.heatmaps import render_heatmaps
from histcode.apps.predict import predict_slides
from histcode.cli import app
from histcode.ingest.sources import read_manifest
from histcode.store.catalog import Catalog
from histcode.store.sql import run_sql
from histcode.workspace import file_stem
from tests.conftest import runs_left_running


def _tree(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


def test_file_stems_are_safe_and_distinct() -> None:
    ids = ["TCGA-05-4244-01Z-00-DX1.2d8c", "../x", "..", ".", "/abs", "a/b", "a_b", "a'b", "片子", "x" * 300, ""]
    stems = [file_stem(i) for i in ids]
    assert stems[0] == ids[0]  # ordinary accessions are kept as they are
    assert len(set(stems)) == len(ids)
    for stem in stems:
        assert stem and len(stem) <= 96 and not stem.startswith(".") and "/" not in stem and stem.isascii()


@pytest.mark.integration
def test_hostile_slide_ids_leave_no_file_outside_the_workspace(headed_workspace, copy_workspace, other_cohort,
                                                               tmp_path) -> None:
    ws = copy_workspace(headed_workspace)
    escaped = tmp_path / "escaped"
    escaped.mkdir()  # so that an id that climbs out of a folder would succeed in writing here
    hostile = ["../" * 30 + str(escaped / "x").lstrip("/"), str(escaped / "abs"), "/abs",
               "a'b \"quoted\" $x^2$", "片子-αβγ-😀", "L" * 300]
    rows = list(csv.DictReader(other_cohort.manifest.open()))[:len(hostile)]
    manifest = tmp_path / "hostile.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["path", "slide_id", "patient_id"])
        writer.writeheader()
        for sid, row in zip(hostile, rows):
            writer.writerow({"path": str(other_cohort.out_dir / row["path"]), "slide_id": sid, "patient_id": f"P-{sid[:8]}"})
    outside_before = _tree(tmp_path, ws.root)
    root_before = set(os.listdir("/"))

    cfg = ws.config()
    result = predict_slides(ws, cfg, read_manifest(manifest), heatmap_dir=ws.outputs_dir / "predicted", progress=False)
    assert list(result.predictions.slide_id) == hostile
    assert (result.predictions.status == "ok").all(), result.predictions[["slide_id", "reason"]]
    for sid in hostile:
        drawn = render_heatmaps(ws, sid, ws.outputs_dir / "heatmaps", genes=["KRT5"])
        assert drawn.pictures and all(p.parent == ws.outputs_dir / "heatmaps" and p.is_file() for p in drawn.pictures)
        assert drawn.pictures[0].name == f"{file_stem(sid)}.attention.png"
        again = render_heatmaps(ws, sid, ws.outputs_dir / "heatmaps", genes=["KRT5"])  # found again by its key
        assert again.pictures == drawn.pictures and len(again.scores) == len(drawn.scores)

    catalog = Catalog.of(ws)
    assert {s["slide_id"] for s in catalog.slides(status="ok")} >= set(hostile)
    qc = {p.name for p in (ws.outputs_dir / "qc").rglob("*.qc.png")}
    assert {f"{file_stem(s)}.qc.png" for s in hostile} <= qc
    quoted = hostile[3].replace("'", "''")
    scores = run_sql(ws, f"SELECT count(*) AS n FROM tile_scores WHERE slide_id = '{quoted}'").column("n")[0].as_py()
    assert scores > 0
    runner = CliRunner()
    out = runner.invoke(app, ["--workspace", str(ws.root), "search", "--slide", hostile[3], "--k", "3", "--format", "json"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["--workspace", str(ws.root), "heatmap", hostile[4]])
    assert out.exit_code == 0 and "tile scores stored" in out.output, out.output

    assert _tree(tmp_path, ws.root) == outside_before, "files were written outside the workspace"
    assert not list(escaped.iterdir())
    assert set(os.listdir("/")) == root_before
    assert runs_left_running(ws) == []


def test_ids_that_name_nothing_are_refused_with_their_reason(workspace, config, cmu_slide, tmp_path) -> None:
    from histcode.ingest.run import ingest_sources

    manifest = tmp_path / "bad.csv"
    manifest.write_text(f"path,slide_id\n{cmu_slide},\"tab\tin id\"\n{cmu_slide},\"new\nline\"\n")
    report = ingest_sources(read_manifest(manifest), Catalog.of(workspace), config.ingest, progress=False)
    reasons = [o.reason for o in report.outcomes]
    assert len(reasons) == 2 and all("control characters" in r for r in reasons), reasons
    assert Catalog.of(workspace).slides() == []
