"""A real Prefect run of the ingest flow (temporary local API, no server to start)."""

from __future__ import annotations

import pandas as pd
import pytest

from histcode.store.catalog import Catalog
from histcode.workspace import Workspace


@pytest.fixture(scope="module")
def _module_prefect_home(tmp_path_factory):
    # Prefect keeps one temporary API server per process (a singleton per port) whose SQLite database lives in
    # the PREFECT_HOME it first saw: every test here shares that home, and nothing removes it while the server
    # may still open new connections to it (a removed home came back as "unable to open database file", a 500
    # from the concurrency-slot endpoint, in a later test)
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture
def prefect_home(_module_prefect_home, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(_module_prefect_home))
    monkeypatch.setenv("PREFECT_API_URL", "")
    return _module_prefect_home


@pytest.mark.integration
def test_ingest_flow_run(tiny_cohort, tmp_path, prefect_home) -> None:
    from prefect.client.orchestration import get_client  # noqa: F401  (Prefect import after PREFECT_HOME is set)

    from flows.ingest import ingest_flow

    slides = pd.read_csv(tiny_cohort.out_dir / "slides.csv").head(3)
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"\x00" * 100)
    ws = Workspace(tmp_path / "ws")
    paths = [str(tiny_cohort.out_dir / p) for p in slides.path] + [str(bad)]
    summary = ingest_flow(paths=paths, workspace=str(ws.root))
    assert summary["ingest"]["registered"] == 3 and summary["ingest"]["failed"] == 1
    assert summary["ingest"]["failures"] == {"broken": "not a whole-slide image format OpenSlide recognises"}
    assert summary["tiling"]["slides_tiled_ok"] == 3 and summary["tiling"]["tiles"] > 0
    catalog = Catalog.of(ws)
    assert catalog.tiles().num_rows == summary["tiling"]["tiles"]
    assert (ws.metrics_dir / "tiling.json").is_file()
    # the same flow again does no work
    again = ingest_flow(paths=paths, workspace=str(ws.root))
    assert again["ingest"]["unchanged"] == 3 and again["tiling"]["tiled_now"] == 0 and again["tiling"]["skipped"] == 3


@pytest.mark.integration
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_flow_records_slide_errors_instead_of_crashing(tiny_cohort, tmp_path, prefect_home) -> None:
    from flows.ingest import ingest_flow

    ws = Workspace(tmp_path / "ws").ensure()
    (ws.root / "params.yaml").write_text("tiling:\n  device: cuda\n")  # a config error every slide hits
    slides = pd.read_csv(tiny_cohort.out_dir / "slides.csv").head(2)
    summary = ingest_flow(paths=[str(tiny_cohort.out_dir / p) for p in slides.path], workspace=str(ws.root))
    assert summary["tiling"]["failed"] == 2 and summary["tiling"]["slides_tiled_ok"] == 0
    assert all("no CUDA device" in reason for reason in summary["tiling"]["failures"].values())
    assert len(Catalog.of(ws).tilings()) == 2  # both recorded in the ledger with their reason


@pytest.mark.integration
def test_pretrain_flow_run(tiled_workspace, prefect_home) -> None:
    import yaml

    from flows.pretrain import pretrain_flow
    from histcode.config import PretrainConfig, ProbeConfig

    cfg = PretrainConfig(image_px=32, batch_size=8, max_steps=2, bank_size=16, probe=ProbeConfig(enabled=False))
    (tiled_workspace.root / "params.yaml").write_text(yaml.safe_dump({"pretrain": cfg.model_dump(mode="json")}))
    summary = pretrain_flow(method="moco", workspace=str(tiled_workspace.root))
    assert summary["method"] == "moco" and summary["steps"] == 2 and summary["version"] == "1"
    assert (tiled_workspace.metrics_dir / "pretrain.json").is_file()


@pytest.mark.integration
def test_labels_flow_passes_and_stops_on_a_failed_gate(tiled_workspace, tiny_cohort, prefect_home) -> None:
    import yaml

    from flows.labels import LabelGateFailed, labels_flow

    ws = tiled_workspace
    (ws.root / "params.yaml").write_text(yaml.safe_dump({"labels": {"min_class_size": 1, "folds": 2}}))
    out = labels_flow(expression=str(tiny_cohort.out_dir / "expression.tsv"), workspace=str(ws.root))
    assert out["gate"]["passed"] and out["labels"]["patients"] == 4
    (ws.root / "params.yaml").write_text(yaml.safe_dump({"labels": {"min_class_size": 5, "folds": 2}}))
    with pytest.raises(LabelGateFailed, match="slide classes with fewer than 5 slides"):
        labels_flow(expression=str(tiny_cohort.out_dir / "expression.tsv"), workspace=str(ws.root))


@pytest.mark.integration
def test_heads_flow_reuses_unchanged_heads_and_refuses_an_ungated_label_set(headed_workspace, copy_workspace,
                                                                            prefect_home) -> None:
    import yaml

    from flows.heads import heads_flow
    from histcode.labels.run import LabelGateError, gate_labels

    ws = copy_workspace(headed_workspace)
    out = heads_flow(heatmaps=1, workspace=str(ws.root))
    assert out["reused"] and out["runs"]["tumor/attention"]["run_id"]  # nothing changed: nothing retrained
    assert len(out["heatmaps"]) == 1 and all(p.endswith(".png") for p in out["heatmaps"][0]["pictures"])
    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    params["labels"]["min_class_size"] = 50
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
    assert not gate_labels(ws, ws.config()).passed
    with pytest.raises(LabelGateError, match="failed the gate"):
        heads_flow(heatmaps=0, workspace=str(ws.root))
