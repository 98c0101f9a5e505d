"""`histcode doctor` on real stores: a missing weight file, an unscaled slide, an unreachable store, a damaged
catalog and a lost vector table are each found by name, and the check writes nothing."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from histcode.cli import app
from histcode.config import HistcodeConfig
from histcode.doctor import FAIL, OK, DoctorOptions, run_doctor
from histcode.doctor.environment import torch_checks
from histcode.workspace import Workspace
from tests.helpers import slide_with_rect, write_svs, write_tiff_96dpi

STORES = ("stores", "encoders")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _failures(findings) -> dict[str, str]:
    return {f.item: f.detail for f in findings if f.status == FAIL}


def _tree(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def workspace_copy(embedded_workspace, copy_workspace) -> Workspace:
    from histcode.tracking import Tracker

    ws = copy_workspace(embedded_workspace)
    Tracker(ws).client  # the copy's MLflow store points at its own artifacts from here on (a write, done here)
    return ws


def test_healthy_workspace_has_no_failure_and_doctor_writes_nothing(workspace_copy):
    before = _tree(workspace_copy.root)
    findings = run_doctor(workspace_copy, workspace_copy.config(), DoctorOptions(sample=2, areas=("stores", "encoders",
                                                                                                   "slides")))
    assert not _failures(findings), _failures(findings)
    items = {f.item for f in findings if f.status == OK}
    assert any(i.startswith("catalog ") for i in items)
    assert any(i.startswith("slide ") for i in items)
    assert any(i.startswith("histcode-encoder/") for i in items)
    assert any(" tile table" in i for i in items)
    assert _tree(workspace_copy.root) == before


def test_missing_encoder_weights_are_named(workspace_copy):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=workspace_copy.mlflow_uri, registry_uri=workspace_copy.mlflow_uri)
    version = client.search_model_versions("name = 'histcode-encoder'")[0]
    from urllib.parse import urlparse

    state = Path(urlparse(client.get_run(version.run_id).info.artifact_uri).path) / "encoder_module" / "state.pt"
    assert workspace_copy.root in state.resolve().parents  # the copy's own file, not the session fixture's
    state.unlink()
    failures = _failures(run_doctor(workspace_copy, workspace_copy.config(), DoctorOptions(areas=STORES)))
    named = [item for item in failures if item.startswith(f"histcode-encoder/{version.version} ")]
    assert named, failures
    assert "encoder_module/state.pt" in failures[named[0]] and "missing" in failures[named[0]]


def test_missing_foundation_weight_file_is_named(tmp_path):
    ws = Workspace(tmp_path / "ws")
    missing = tmp_path / "nowhere" / "pytorch_model.bin"
    findings = run_doctor(ws, HistcodeConfig(), DoctorOptions(areas=("encoders",), weights={"uni": missing}))
    failures = _failures(findings)
    assert list(failures) == [f"weights uni = {missing}"]
    assert str(missing) in failures[f"weights uni = {missing}"] or "not found" in failures[f"weights uni = {missing}"]


def test_wrong_foundation_weight_file_is_named(tmp_path):
    import torch

    bad = tmp_path / "pytorch_model.bin"
    torch.save({"not.a.vit.key": torch.zeros(3)}, bad)
    failures = _failures(run_doctor(Workspace(tmp_path / "ws"), HistcodeConfig(),
                                    DoctorOptions(areas=("encoders",), weights={"kaiko-vit-s16": bad})))
    assert list(failures) == [f"weights kaiko-vit-s16 = {bad}"]


def test_unscaled_slide_is_named_and_mpp_fixes_it(tmp_path):
    rng = np.random.default_rng(0)
    image = slide_with_rect(rng, (768, 1024), (128, 128, 896, 640))
    unscaled = write_tiff_96dpi(tmp_path / "slides" / "unscaled.tiff", image)
    write_svs(tmp_path / "slides" / "scaled.svs", image)
    ws = Workspace(tmp_path / "ws")
    findings = run_doctor(ws, HistcodeConfig(), DoctorOptions(areas=("slides",), slide_paths=(tmp_path / "slides",)))
    failures = _failures(findings)
    assert list(failures) == [f"file {unscaled}"]
    assert "mpp" in failures[f"file {unscaled}"]
    scaled = [f for f in findings if f.item.endswith("scaled.svs")]
    assert scaled[0].status == OK and "tissue" in scaled[0].detail
    again = run_doctor(ws, HistcodeConfig(), DoctorOptions(areas=("slides",), slide_paths=(unscaled,), mpp=0.5))
    assert not _failures(again)


def test_blank_slide_has_no_tissue(tmp_path):
    blank = write_svs(tmp_path / "blank.svs", np.full((512, 512, 3), 242, dtype=np.uint8))
    failures = _failures(run_doctor(Workspace(tmp_path / "ws"), HistcodeConfig(),
                                    DoctorOptions(areas=("slides",), slide_paths=(blank,))))
    assert "no tissue" in failures[f"file {blank}"]


def test_unreachable_services_are_named(workspace_copy, monkeypatch):
    mlflow_url, s3_url = f"http://127.0.0.1:{_free_port()}", f"http://127.0.0.1:{_free_port()}"
    prefect_url, dask = f"http://127.0.0.1:{_free_port()}/api", f"tcp://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("HISTCODE_MLFLOW_URI", mlflow_url)
    monkeypatch.setenv("HISTCODE_LANCEDB_URI", "s3://histcode/lancedb")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_url)
    monkeypatch.setenv("PREFECT_API_URL", prefect_url)
    monkeypatch.setenv("HISTCODE_DASK_ADDRESS", dask)
    failures = _failures(run_doctor(workspace_copy, workspace_copy.config(), DoctorOptions(areas=STORES)))
    assert f"MLflow server {mlflow_url}" in failures
    assert f"Prefect API {prefect_url}" in failures
    assert f"Dask scheduler {dask}" in failures
    assert f"S3 endpoint {s3_url}" in failures
    assert any(item.startswith("vector tables s3://histcode/lancedb/") and s3_url in detail
               for item, detail in failures.items())


def test_damaged_catalog_and_lost_table_are_named(workspace_copy):
    import duckdb

    con = duckdb.connect(str(workspace_copy.catalog_path), read_only=True)
    table = con.execute("SELECT lance_table FROM feature_views WHERE kind = 'tile' AND status = 'ok'").fetchall()[0][0]
    con.close()
    import shutil

    shutil.rmtree(workspace_copy.lancedb_dir / f"{table}.lance")
    failures = _failures(run_doctor(workspace_copy, workspace_copy.config(), DoctorOptions(areas=("stores",))))
    lost = [item for item in failures if item.endswith(" tile table")]
    assert lost and table in failures[lost[0]] and "missing" in failures[lost[0]]

    data = workspace_copy.catalog_path.read_bytes()
    workspace_copy.catalog_path.write_bytes(data[: len(data) // 3])
    failures = _failures(run_doctor(workspace_copy, workspace_copy.config(), DoctorOptions(areas=("stores",))))
    assert f"catalog {workspace_copy.catalog_path}" in failures
    assert "cannot be opened" in failures[f"catalog {workspace_copy.catalog_path}"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_asked_for_without_a_gpu_fails():
    cfg = HistcodeConfig.model_validate({"tiling": {"device": "cuda"}})
    gpu = [f for f in torch_checks(cfg) if f.item == "GPU"][0]
    assert gpu.status == FAIL and "tiling.device" in gpu.detail


def test_command_exits_1_and_names_the_problem(tmp_path):
    rng = np.random.default_rng(1)
    unscaled = write_tiff_96dpi(tmp_path / "unscaled.tiff", slide_with_rect(rng, (768, 1024), (128, 128, 896, 640)))
    env = {**os.environ, "HISTCODE_MLFLOW_URI": f"http://127.0.0.1:{_free_port()}"}
    runner = CliRunner()
    result = runner.invoke(app, ["-w", str(tmp_path / "ws"), "doctor", "--slides", str(unscaled), "--format", "json"],
                           env=env)
    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout)
    failed = {r["item"] for r in rows if r["status"] == "fail"}
    assert f"file {unscaled}" in failed and any(i.startswith("MLflow server ") for i in failed)
    assert all(r["fix"] for r in rows if r["status"] == "fail")
    assert not (tmp_path / "ws").exists()  # nothing created

    table = runner.invoke(app, ["-w", str(tmp_path / "ws"), "doctor", "--area", "slides", "--slides", str(unscaled),
                                "--mpp", "0.5"], env=env)
    assert table.exit_code == 0, table.output
    assert "0 failure(s)" in table.output
