"""MLflow as HistCode uses it: runs always end, runs of killed processes are ended, a copied or moved
workspace's store follows it, params read well in the compare view, filters take any value."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from histcode.tracking import Tracker, flatten, quote
from histcode.workspace import Workspace
from tests.conftest import runs_left_running


def _status(tracker: Tracker, run_id: str) -> str:
    return tracker.client.get_run(run_id).info.status


def test_runs_end_finished_failed_or_killed(workspace) -> None:
    tracker = Tracker(workspace)
    with tracker.run("t", "fine") as ok:
        pass
    with pytest.raises(ZeroDivisionError):
        with tracker.run("t", "broken") as broken:
            1 / 0
    with pytest.raises(KeyboardInterrupt):
        with tracker.run("t", "interrupted") as stopped:
            raise KeyboardInterrupt
    assert [_status(tracker, r) for r in (ok, broken, stopped)] == ["FINISHED", "FAILED", "KILLED"]
    assert runs_left_running(workspace) == []


KILLED_OWNER = """
import os, signal, sys
from histcode.tracking import Tracker
from histcode.workspace import Workspace
run = Tracker(Workspace.resolve(sys.argv[1])).start_run("t", "doomed")
print(run, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_whose_process_was_killed_is_ended_by_the_next_process(workspace) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_OWNER, str(workspace.root)], capture_output=True, text=True)
    assert done.returncode == -9
    doomed = done.stdout.strip()
    assert _status(Tracker(workspace), doomed) == "RUNNING"  # nothing has looked yet
    live = Tracker(workspace).start_run("t", "mine, alive")  # opening a run ends the dead process's runs
    tracker = Tracker(workspace)
    with tracker.run("t", "next command"):
        pass
    run = tracker.client.get_run(doomed)
    assert run.info.status == "KILLED" and "died" in run.data.tags["histcode.end_reason"]
    assert _status(tracker, live) == "RUNNING"  # a live owner's run is left alone
    tracker.end_run(live)


def test_a_copied_workspace_writes_its_artifacts_into_itself(tmp_path) -> None:
    original = Workspace(tmp_path / "original").ensure()
    tracker = Tracker(original)
    with tracker.run("heads", "first") as run_id:
        (tmp_path / "a.txt").write_text("a")
        tracker.log_artifact(run_id, tmp_path / "a.txt")
        model = torch.nn.Linear(4, 2).eval()
        tracker.log_torch_model(run_id, model, "m", (4,), 2, "histcode-test-model", aliases=("x",))
    snapshot = {p: p.stat().st_mtime_ns for p in original.root.rglob("*") if p.is_file()}
    shutil.copytree(original.root, tmp_path / "copy")
    copy = Workspace(tmp_path / "copy")
    moved = tmp_path / "gone"
    original.root.rename(moved)  # the original is not even there any more
    ctracker = Tracker(copy)
    old = ctracker.client.get_run(run_id)
    assert old.info.artifact_uri.startswith(copy.root.resolve().as_uri())
    assert [a.path for a in ctracker.client.list_artifacts(run_id)] == ["a.txt"]
    loaded = ctracker.load_model("models:/histcode-test-model@x")
    assert loaded(torch.zeros(3, 4)).shape == (3, 2)
    with ctracker.run("heads", "second") as second:
        ctracker.log_artifact(second, tmp_path / "a.txt")
    assert ctracker.client.get_run(second).info.artifact_uri.startswith(copy.root.resolve().as_uri())
    assert list((copy.mlruns_dir / "artifacts").rglob("a.txt"))
    moved.rename(original.root)
    assert {p: p.stat().st_mtime_ns for p in original.root.rglob("*") if p.is_file()} == snapshot


def test_params_are_flat_and_filters_take_quotes(workspace) -> None:
    assert flatten({"heads": {"aggregators": ("attention", "mean"), "epochs": 3}}) == {
        "heads.aggregators": "attention,mean", "heads.epochs": 3}
    tracker = Tracker(workspace)
    with tracker.run("t", "quoted", tags={"histcode.slide_id": "a'b"}) as run_id:
        pass
    value = "a'b"
    found = tracker.client.search_runs([tracker.experiment_id("t")], f"tags.`histcode.slide_id` = {quote(value)}")
    assert [r.info.run_id for r in found] == [run_id]
    with pytest.raises(ValueError, match="both quote"):
        quote("a'b\"c")


def _encoder_run(tracker: Tracker, encoder, name: str, px: int, weights_once: bool) -> str:
    """Log ``encoder`` as registering does: its module (recipe and state dict), then its program; returns the
    version. ``weights_once`` False: the layout of versions registered before, weights in both."""
    from histcode.ssl.modules import MODULE_ARTIFACT, STATE, log_module

    with tracker.run("encoders", name) as run_id:
        log_module(tracker, run_id, encoder)
        _, version = tracker.log_torch_model(run_id, encoder, "encoder", (3, px, px), encoder.dim, name,
                                             aliases=("x",), version_tags={"run_id": run_id},
                                             weights_artifact=f"{MODULE_ARTIFACT}/{STATE}" if weights_once else None)
    return version


def test_an_encoder_s_weights_are_stored_once_and_the_program_follows_a_copied_workspace(tmp_path) -> None:
    """The program is logged without the tensors of the module's state dict and gets them back on load (from the
    run the copy's store points at); a version of the old layout, weights in both, still loads as it was."""
    import mlflow

    from histcode.features.registry import load_encoder
    from histcode.ssl.encoders import build_encoder
    from histcode.tracking import ModelWeightsError

    torch.manual_seed(0)
    encoder = build_encoder("resnet18_l3", "random").eval()
    weights = sum(t.numel() * t.element_size() for t in encoder.state_dict().values())
    original = Workspace(tmp_path / "original").ensure()
    tracker = Tracker(original)
    once, twice = (_encoder_run(tracker, encoder, n, 64, w) for n, w in (("once", True), ("twice", False)))
    stored, old = tracker.stored_bytes("once", once), tracker.stored_bytes("twice", twice)
    assert sum(stored.values()) < 1.3 * weights < 2 * weights < sum(old.values())
    assert old["model"] - stored["model"] > 0.99 * weights  # the program left its copy out

    shutil.copytree(original.root, tmp_path / "copy")
    original.root.rename(tmp_path / "gone")
    copy = Tracker(Workspace(tmp_path / "copy"))
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        want = encoder(x)
        for name in ("once", "twice"):
            assert torch.allclose(copy.load_model(f"models:/{name}@x")(x), want, atol=1e-5), name
            assert torch.allclose(load_encoder(copy.ws, f"{name}@x")(x), want, atol=1e-5), name
        mlflow.set_tracking_uri(copy.uri)
        mlflow.set_registry_uri(copy.uri)
        with pytest.raises(RuntimeError, match="meta"):  # without HistCode's loader it fails, never embeds with zeros
            mlflow.pytorch.load_model("models:/once@x")(x)

    run_id = copy.client.get_model_version("once", once).run_id
    (next((copy.ws.mlruns_dir / "artifacts").rglob(f"{run_id}/artifacts/encoder_module/state.pt"))).unlink()
    with pytest.raises(ModelWeightsError, match="encoder_module/state.pt, which cannot be read"):
        copy.load_model("models:/once@x")
    with copy.run("encoders", "no module") as bare, pytest.raises(ValueError, match="has no artifact encoder_module"):
        copy.log_torch_model(bare, encoder, "encoder", (3, 64, 64), encoder.dim,
                             weights_artifact="encoder_module/state.pt")
