"""Shared fixtures: real slides copied into tests/fixtures, a small demo cohort built once per session, and
an isolated workspace per test. Telemetry is off: this machine has no network for it."""

from __future__ import annotations

import os

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    # the temporary Prefect servers keep SQLite databases; on a loaded 2-core machine give their writers time
    # ("database is locked" once came back as a 500 from the concurrency-slot endpoint)
    "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
    "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30",
    # a flow run starts Prefect's temporary API server (a fresh SQLite database, its migrations) and waits 20 s
    # for it by default: a loaded 2-core machine once took longer
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}.items():
    os.environ.setdefault(_key, _value)

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from histcode.config import DemoConfig, HistcodeConfig  # noqa: E402
from histcode.workspace import Workspace  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
SLIDES = FIXTURES / "slides"

# A cohort small enough to build in seconds that still has every format: Aperio 20x and 40x, generic TIFF,
# tumour slides of both subtypes and matched normals.
TINY_DEMO = DemoConfig(
    n_patients=4, canvas_cells=(6, 8), matched_normal_fraction=0.75, fraction_40x=0.3, fraction_generic_tiff=0.3
)


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    return SLIDES / "CMU-1-Small-Region.svs"


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws").ensure()


@pytest.fixture
def config() -> HistcodeConfig:
    return HistcodeConfig()


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory):
    """The tiny demo cohort, built once; tests that modify slides must copy them first."""
    from histcode.demo.build import build_demo_cohort

    out = tmp_path_factory.mktemp("demo") / "demo"
    return build_demo_cohort(TINY_DEMO, out, progress=False)


@pytest.fixture
def copy_slide(tmp_path: Path):
    """Copy a fixture slide into the test's folder (fixtures are never modified)."""

    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / "in" / (name or src.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        return dst

    return _copy


def _tile_cohort(cohort, root: Path) -> Workspace:
    from histcode.ingest.run import ingest_sources
    from histcode.ingest.sources import read_manifest
    from histcode.store.catalog import Catalog
    from histcode.tiling.run import tile_slides

    ws = Workspace(root / "ws").ensure()
    cfg = HistcodeConfig()
    catalog = Catalog.of(ws)
    ingest_sources(read_manifest(cohort.manifest), catalog, cfg.ingest, progress=False)
    report = tile_slides(catalog, cfg.tiling, ws.outputs_dir / "qc", progress=False)
    assert not report.failed
    return ws


@pytest.fixture(scope="session")
def tiled_catalog(tiny_cohort, tmp_path_factory) -> Path:
    """A catalog with the tiny cohort ingested and tiled under the default spec (copy it before writing)."""
    return _tile_cohort(tiny_cohort, tmp_path_factory.mktemp("tiled")).catalog_path


@pytest.fixture
def tiled_workspace(tiled_catalog, tmp_path) -> Workspace:
    """A fresh workspace whose catalog already holds the tiled tiny cohort."""
    ws = Workspace(tmp_path / "tws").ensure()
    shutil.copy2(tiled_catalog, ws.catalog_path)
    return ws


TINY_PRETRAIN = {"image_px": 32, "batch_size": 8, "max_steps": 1, "bank_size": 16, "probe": {"enabled": False}}


@pytest.fixture(scope="session")
def embedded_workspace(tiled_catalog, tmp_path_factory) -> Workspace:
    """A workspace with the tiny cohort tiled, a 1-step encoder registered and its feature view materialised.
    Read-only for tests: copy it (``copy_workspace``) before writing."""
    ws = Workspace(tmp_path_factory.mktemp("embedded") / "ws").ensure()
    shutil.copy2(tiled_catalog, ws.catalog_path)
    return _embed(ws)


def _embed(ws: Workspace) -> Workspace:
    import yaml

    from histcode.features.embed import materialize
    from histcode.ssl.pretrain import pretrain

    (ws.root / "params.yaml").write_text(yaml.safe_dump({"pretrain": TINY_PRETRAIN}))
    pretrain(ws, ws.config(), progress=False)
    report = materialize(ws, ws.config(), tag="first", progress=False)
    assert not report.failed
    return ws


@pytest.fixture
def copy_workspace(tmp_path):
    def _copy(ws: Workspace) -> Workspace:
        target = tmp_path / "copy"
        shutil.copytree(ws.root, target)
        # MLflow stores absolute artifact paths; the copy keeps pointing at the original's artifacts, read-only
        return Workspace(target)

    return _copy


TINY_HEADS = {"epochs": 30, "patience": 8, "bootstrap": 50, "aggregators": ["attention", "mean", "guided"], "k_sample": 2}


# The heads need more patients than the tiny cohort has for cross-validation to mean anything: 10 patients,
# 2-3 slides each, on the same small canvas.
# The heads' machinery tests need a signal a one-step encoder can find, so this cohort leaves out the demo's hard
# cases (small foci, a stain per site): those are tested in test_demo.py and measured by `histcode demo`.
HEADS_DEMO = DemoConfig(n_patients=10, canvas_cells=(6, 8), seed=11, fraction_40x=0.0, fraction_generic_tiff=0.0,
                        small_focus_share=0.0, tumour_fraction=(0.3, 0.7), sites=("HC",), stain_site_angle=0.0,
                        stain_site_scale=(1.0, 1.0))


@pytest.fixture(scope="session")
def heads_cohort(tmp_path_factory: pytest.TempPathFactory):
    from histcode.demo.build import build_demo_cohort

    return build_demo_cohort(HEADS_DEMO, tmp_path_factory.mktemp("heads_demo") / "demo", progress=False)


@pytest.fixture(scope="session")
def headed_workspace(heads_cohort, tmp_path_factory) -> Workspace:
    """The heads cohort tiled, embedded, labelled through the gate, with heads trained and registered, their
    summary in metrics/heads.json (read-only)."""
    import yaml

    from histcode.apps.train_heads import train_heads
    from histcode.labels.run import gate_labels, ingest_labels
    from histcode.reports import write_heads_report

    ws = _embed(_tile_cohort(heads_cohort, tmp_path_factory.mktemp("headed")))
    params = {"pretrain": TINY_PRETRAIN, "labels": {"min_class_size": 2, "folds": 3}, "heads": TINY_HEADS}
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
    ingest_labels(ws, ws.config(), heads_cohort.out_dir / "expression.tsv")
    assert gate_labels(ws, ws.config()).passed
    write_heads_report(train_heads(ws, ws.config()), ws.metrics_dir / "heads.json", ws.metrics_dir / "plots")
    return ws


# Slides the training cohorts never saw (another seed): for prediction, cohorts and hostile slide ids.
OTHER_DEMO = DemoConfig(n_patients=3, canvas_cells=(6, 8), seed=23, matched_normal_fraction=1.0, fraction_40x=0.0,
                        fraction_generic_tiff=0.0)


@pytest.fixture(scope="session")
def other_cohort(tmp_path_factory: pytest.TempPathFactory):
    from histcode.demo.build import build_demo_cohort

    return build_demo_cohort(OTHER_DEMO, tmp_path_factory.mktemp("other_demo") / "demo", progress=False)


def runs_left_running(ws: Workspace) -> list[str]:
    """Names of the MLflow runs of ``ws`` that are still RUNNING (there must be none after any command)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=ws.mlflow_uri, registry_uri=ws.mlflow_uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_name for r in client.search_runs(ids, "attributes.status = 'RUNNING'")] if ids else []
