"""params.yaml loading and workspace resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from histcode.config import ConfigError, HistcodeConfig, load_config
from histcode.workspace import ENV_VAR, REPO_ROOT, Workspace, resolve_root


def test_repo_params_equal_defaults() -> None:
    # params.yaml documents the defaults; the two must not drift apart
    assert load_config(REPO_ROOT / "params.yaml") == HistcodeConfig()


def test_missing_params_gives_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "params.yaml") == HistcodeConfig()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("tiling:\n  tile_pz: 256\n", "tile_pz"),
        ("tiling:\n  target_mpp: -1\n", "target_mpp"),
        ("nonsense: {}\n", "nonsense"),
        ("tiling:\n  mask:\n    median_kernel: 4\n", "odd"),
        ("demo:\n  tumour_fraction: [0.8, 0.2]\n", "lower bound"),
        ("- a\n- b\n", "mapping"),
        ("tiling: [unclosed\n", "YAML"),
    ],
)
def test_bad_params_name_the_problem(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_workspace_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_root() == REPO_ROOT
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert resolve_root() == tmp_path / "env"
    assert resolve_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_every_store_derives_from_the_root(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    for p in (ws.catalog_path, ws.lancedb_dir, ws.mlruns_dir, ws.outputs_dir, ws.metrics_dir, ws.params_path):
        assert tmp_path in p.parents
    assert ws.mlflow_uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert ws.path("data/x") == tmp_path / "data/x" and ws.path("/abs") == Path("/abs")
