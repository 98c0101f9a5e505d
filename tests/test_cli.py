"""The `histcode` command as a user runs it: exit codes, tables, reasons, workspaces, the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from histcode.cli import app
from histcode.config import PretrainConfig, ProbeConfig
from histcode.store.catalog import Catalog
from histcode.workspace import Workspace
from tests.conftest import SLIDES, TINY_DEMO, TINY_HEADS, runs_left_running

runner = CliRunner()


def invoke(ws, *args):
    return runner.invoke(app, ["--workspace", str(ws), *map(str, args)], env={"COLUMNS": "250"})


def _command_paths(command, prefix=()) -> list[tuple[str, ...]]:
    """Every command and subcommand of the click group, as argument paths."""
    paths = [prefix]
    for name, sub in getattr(command, "commands", {}).items():
        paths += _command_paths(sub, (*prefix, name))
    return paths


def test_every_command_runs_from_every_entry_point() -> None:
    """`histcode X`, `python -m histcode X` and `python -m histcode.cli X` all reach every command."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import typer

    paths = _command_paths(typer.main.get_command(app))
    assert {("pretrain",), ("labels", "gate"), ("heads",), ("predict",)} <= set(paths) and len(paths) > 15
    entry_points = ([str(Path(sys.executable).with_name("histcode"))], [sys.executable, "-m", "histcode"],
                    [sys.executable, "-m", "histcode.cli"])
    jobs = [(entry, path) for entry in entry_points for path in paths]

    def run(job):
        entry, path = job
        return job, subprocess.run([*entry, *path, "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})

    with ThreadPoolExecutor(4) as pool:
        for (entry, path), done in pool.map(run, jobs):
            where = " ".join([Path(entry[-1]).name, *path])
            assert done.returncode == 0, f"{where} --help: {done.stderr[-500:]}"
            assert "Usage:" in done.stdout and " ".join(path) in done.stdout, where


def test_help_is_fast_and_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "histcode.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo-data", "ingest", "tile", "slides", "demo"):
        assert command in out.stdout
    # heavy libraries are imported inside commands only
    probe = "import sys, histcode.cli; print(any(m in sys.modules for m in ('torch', 'openslide', 'duckdb', 'prefect')))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_ingest_and_tile_exit_codes(tmp_path, cmu_slide) -> None:
    ws = tmp_path / "ws"
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    result = invoke(ws, "ingest", cmu_slide, empty, SLIDES / "boxes.tiff")
    assert result.exit_code == 1
    assert "empty file (0 bytes)" in result.stdout and "implausible" in result.stdout
    assert "2 of 3 slides failed" in result.stdout.replace("\n", " ")
    report = json.loads((ws / "metrics" / "ingest.json").read_text())
    assert report["registered"] == 1 and report["failed"] == 2
    result = invoke(ws, "ingest", SLIDES / "boxes.tiff", "--mpp", "0.5")  # the user supplies the scale
    assert result.exit_code == 0, result.stdout
    result = invoke(ws, "tile")  # boxes.tiff (300 x 250 px) cannot hold one 256 px tile: exit 1, CMU-1 is tiled
    assert result.exit_code == 1, result.stdout
    tiling = json.loads((ws / "metrics" / "tiling.json").read_text())
    assert tiling["slides_tiled_ok"] == 1 and tiling["tiles"] > 30
    assert tiling["failures"] == {"boxes": "slide 300x250 px is smaller than one tile (256 px at level 0)"}
    assert tiling["not_ingested"] == ["empty"]
    result = invoke(ws, "slides")
    assert result.exit_code == 0 and "CMU-1-Small-Region" in result.stdout and "failed" in result.stdout


def test_usage_errors(tmp_path) -> None:
    ws = tmp_path / "ws"
    assert invoke(ws, "ingest").exit_code == 2
    assert invoke(ws, "tile").exit_code == 2  # no catalog yet
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "params.yaml").write_text("tiling:\n  tile_pz: 3\n")
    result = invoke(ws, "tile")
    assert result.exit_code == 2 and "tile_pz" in result.output


def test_workspace_from_environment(tmp_path, cmu_slide, monkeypatch) -> None:
    monkeypatch.setenv("HISTCODE_HOME", str(tmp_path / "cohort-a"))
    assert runner.invoke(app, ["ingest", str(cmu_slide)]).exit_code == 0
    assert (tmp_path / "cohort-a" / "data" / "catalog.duckdb").is_file()


def test_demo_command_end_to_end(tmp_path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    pretrain = PretrainConfig(image_px=32, batch_size=8, max_steps=2, num_workers=0, bank_size=16,
                              probe=ProbeConfig(folds=3))
    (ws / "params.yaml").write_text(yaml.safe_dump({"demo": TINY_DEMO.model_dump(mode="json"),
                                                    "pretrain": pretrain.model_dump(mode="json"),
                                                    "labels": {"min_class_size": 1, "folds": 2},
                                                    "heads": {**TINY_HEADS, "epochs": 5, "bootstrap": 20}}))
    result = invoke(ws, "demo", "--workers", "1")
    assert result.exit_code == 0, result.stdout
    assert "Demo pipeline done" in result.stdout and "histcode mlflow-ui" in result.stdout
    assert "encoder: adco (2 steps" in result.stdout
    assert "linear probe, reporting half (" in result.stdout and "of 222 held-aside tiles)" in result.stdout
    assert "as they are" in result.stdout and "re-stained" in result.stdout
    assert "slide retrieval by tissue (leave one patient out): mean pooling mMV@5" in result.stdout
    assert "attention pooling" in result.stdout and "mMV@5" in result.stdout
    assert "gate passed" in result.stdout and json.loads((ws / "metrics" / "label_gate.json").read_text())["passed"]
    tiling = json.loads((ws / "metrics" / "tiling.json").read_text())
    assert tiling["failed"] == 0 and tiling["tiled_now"] == tiling["slides"] > 0
    assert "heads (pooled CV): tumor/attention AUC" in result.stdout and "heatmap: " in result.stdout
    heads = json.loads((ws / "metrics" / "heads.json").read_text())
    retrieval = json.loads((ws / "metrics" / "retrieval.json").read_text())
    assert set(retrieval["poolings"]) == {"mean", "attention"}
    assert set(heads["best"]) - {"survival"} == {"tumor", "subtype", "de"} and (ws / "metrics" / "plots" / "roc").is_dir()
    before = _tree(ws)
    again = invoke(ws, "demo", "--workers", "1")  # the workspace is as the complete run left it: the stamp says so
    assert again.exit_code == 0 and "Up to date" in again.stdout and "Demo pipeline done" in again.stdout
    assert "encoder: adco (2 steps" in again.stdout  # the complete run's own summary
    assert _tree(ws) == before  # nothing opened for writing, nothing touched
    recheck = invoke(ws, "demo", "--workers", "1", "--recheck")  # the same untouched workspace, every stage asked
    assert recheck.exit_code == 0 and "Up to date" not in recheck.stdout and "(up to date, reused)" in recheck.stdout
    heatmap = next((ws / "outputs" / "heatmaps").rglob("*.png"))
    os.utime(heatmap, ns=(heatmap.stat().st_atime_ns, heatmap.stat().st_mtime_ns + 1))  # any file of the state
    again = invoke(ws, "demo", "--workers", "1", "--recheck")  # every stage asked, each finds its work done
    assert again.exit_code == 0 and "Up to date" not in again.stdout
    rerun = json.loads((ws / "metrics" / "tiling.json").read_text())
    assert rerun["tiled_now"] == 0 and rerun["skipped"] == tiling["slides"] and rerun["tiles"] == tiling["tiles"]
    assert "encoder: adco (up to date, reused)" in again.stdout
    assert "heads (pooled CV) (up to date, reused)" in again.stdout
    assert json.loads((ws / "metrics" / "heads.json").read_text())["runs"] == heads["runs"]  # not retrained
    assert json.loads((ws / "metrics" / "retrieval.json").read_text()) == retrieval  # nor re-evaluated
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=Workspace(ws).mlflow_uri)
    assert len(client.search_runs([client.get_experiment_by_name("retrieval").experiment_id])) == 2
    assert runs_left_running(Workspace(ws)) == []
    assert "Up to date" in invoke(ws, "demo", "--workers", "1").stdout  # the rechecking run stamped its state
    heatmap.write_bytes(heatmap.read_bytes() + b"\0")  # a changed output: every stage is asked again
    assert "Up to date" not in invoke(ws, "demo", "--workers", "1").stdout
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["heads"]["epochs"] = 6  # a changed parameter: the stamp no longer holds (the heads retrain)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    changed = invoke(ws, "demo", "--workers", "1")
    assert changed.exit_code == 0 and "Up to date" not in changed.stdout and "heads (pooled CV) (up to date" not in changed.stdout
    _copied_workspace_is_self_contained(ws, tmp_path / "copy")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _copied_workspace_is_self_contained(original: Path, copy: Path) -> None:
    """A copy of a demo workspace works in place: its slides are found as unchanged, its tiles reused, and heads
    trained in it write their runs, artifacts and models into it; the original is not touched."""
    shutil.copytree(original, copy)
    before = _tree(original)
    result = invoke(copy, "ingest", "--manifest", copy / "data" / "demo" / "manifest.csv", "--cohort", "demo")
    assert result.exit_code == 0
    ingest = json.loads((copy / "metrics" / "ingest.json").read_text())
    assert ingest["unchanged"] == ingest["slides"] > 0 and ingest["updated"] == 0  # paths are workspace-relative
    assert json.loads(invoke(copy, "slides", "--format", "json").stdout.splitlines()[0])["cohort"] == "demo"
    assert invoke(copy, "tile").exit_code == 0
    assert json.loads((copy / "metrics" / "tiling.json").read_text())["tiled_now"] == 0
    result = invoke(copy, "heads", "--task", "tumor", "--aggregator", "mean", "--force")
    assert result.exit_code == 0, result.output
    summary = json.loads((copy / "metrics" / "heads.json").read_text())
    from mlflow import MlflowClient

    uri = Workspace(copy).mlflow_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(summary["runs"]["tumor/mean"]["run_id"])
    assert run.info.artifact_uri.startswith(copy.resolve().as_uri())
    version = client.get_model_version("histcode-tumor-head", summary["runs"]["tumor/mean"]["version"])
    assert client.get_model_version_download_uri("histcode-tumor-head", version.version).startswith(copy.resolve().as_uri())
    assert _tree(original) == before, "the copy wrote into the original workspace"


def test_labels_commands(tiled_workspace, tiny_cohort) -> None:
    ws = tiled_workspace.root
    (ws / "params.yaml").write_text(yaml.safe_dump({"labels": {"min_class_size": 1, "folds": 2}}))
    result = invoke(ws, "labels", "gate")
    assert result.exit_code == 2 and "no label set yet" in result.output
    result = invoke(ws, "labels", "ingest", tiny_cohort.out_dir / "expression.tsv")
    assert result.exit_code == 0 and "label set ls-" in result.stdout
    result = invoke(ws, "labels", "gate")
    assert result.exit_code == 0 and "label gate passed" in result.stdout and "Data Docs:" in result.stdout
    bad = ws / "bad.tsv"
    lines = (tiny_cohort.out_dir / "expression.tsv").read_text().splitlines()
    lines[1] = lines[1].replace("\t", "\t-", 1)  # the first gene's first value becomes negative
    bad.write_text("\n".join(lines) + "\n")
    assert invoke(ws, "labels", "ingest", bad).exit_code == 0
    result = invoke(ws, "labels", "gate")
    assert result.exit_code == 1 and "values that are negative" in result.stdout
    assert invoke(ws, "labels", "ingest", ws / "missing.tsv").exit_code == 2


def test_embed_sql_search_commands(embedded_workspace, copy_workspace) -> None:
    ws = copy_workspace(embedded_workspace).root
    result = invoke(ws, "embed")
    assert result.exit_code == 0 and "skipped" in result.stdout
    summary = json.loads((ws / "metrics" / "embed.json").read_text())
    assert summary["slides_embedded"] == 0 and summary["slides_skipped"] > 0 and summary["dim"] == 256
    result = invoke(ws, "sql", "SELECT subtype, count(*) AS n FROM tile_embeddings GROUP BY 1 ORDER BY 1", "--format", "csv")
    assert result.exit_code == 0 and result.stdout.startswith("subtype,n")
    assert "view fv-" in result.stderr  # the view behind tile_embeddings is named, off the data stream
    result = invoke(ws, "sql", "DELETE FROM slides")
    assert result.exit_code == 2 and "read-only" in result.output
    result = invoke(ws, "sql", "SELECT no_such_column FROM slides")
    assert result.exit_code == 2 and "no_such_column" in result.output
    slide = json.loads(invoke(ws, "sql", "SELECT slide_id FROM slides ORDER BY 1 LIMIT 1", "--format", "json").stdout)["slide_id"]
    result = invoke(ws, "search", "--slide", slide, "--k", "2", "--json")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and [h["rank"] for h in lines] == [1, 2] and all(h["slide_id"] != slide for h in lines)
    result = invoke(ws, "search", "--slide", "nope")
    assert result.exit_code == 2 and "has no vector" in result.output


def test_tables_fit_the_terminal(embedded_workspace) -> None:
    """At 80 columns every row is one line and no line is wider than the terminal; --wide shows ids whole."""
    ws = str(embedded_workspace.root)
    ids = json.loads(runner.invoke(app, ["--workspace", ws, "sql", "SELECT slide_id FROM slides ORDER BY 1 LIMIT 1",
                                         "--format", "json"]).stdout)
    commands = [["slides"], ["sql", "SELECT * FROM tilings"], ["search", "--slide", ids["slide_id"], "--k", "3"]]
    for command in commands:
        out = runner.invoke(app, ["--workspace", ws, *command], env={"COLUMNS": "80"})
        assert out.exit_code == 0, out.output
        lines = out.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80, out.stdout
        body = [line for line in lines if line.startswith("│")]
        assert len(body) == (3 if command[0] == "search" else len(Catalog.of(embedded_workspace).slides())), out.stdout
    wide = runner.invoke(app, ["--workspace", ws, "slides", "--wide"], env={"COLUMNS": "250"})
    assert all(s["slide_id"] in wide.stdout for s in Catalog.of(embedded_workspace).slides())
    assert "vendor" in wide.stdout and "vendor" not in runner.invoke(app, ["--workspace", ws, "slides"]).stdout
    csv_out = runner.invoke(app, ["--workspace", ws, "slides", "--format", "csv"]).stdout
    assert csv_out.startswith("slide_id,patient_id,cohort,status")
