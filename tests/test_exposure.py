"""Who may read a workspace and which weights it runs (issue 31, "permissions and weights"): a private workspace
made by a real `histcode ingest` has no group/other bit on anything HistCode wrote; `histcode workspace secure`
closes an open one; doctor names an open store and the fix; a Hugging Face cache blob whose content is not its
name is refused by name; weights that differ from the published digest are refused unless
``--allow-other-weights``, which the registered version carries as a tag; weights without a published digest
register with the warning to check the model card.

The encoder here is a one-block ViT registered under a test name (its "published" digest is set by the test), so
that each registration runs the real code in seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from histcode.cli import app
from histcode.workspace import Workspace

from tests.conftest import SLIDES

runner = CliRunner()
CMU = SLIDES / "CMU-1-Small-Region.svs"


def invoke(root: Path, *args, env: dict | None = None):
    return runner.invoke(app, ["--workspace", str(root), *map(str, args)], env={"COLUMNS": "250", **(env or {})})


def flat(output: str) -> str:
    return " ".join(output.split())


def ingest_in_a_shell(root: Path, extra_env: dict[str, str]) -> None:
    """`histcode ingest` of the CMU slide in a fresh process under the usual shared umask (022)."""
    env = {k: v for k, v in os.environ.items() if k != "HISTCODE_PRIVATE"} | extra_env
    done = subprocess.run(["sh", "-c", 'umask 022 && exec "$0" -m histcode --workspace "$1" ingest "$2"',
                           sys.executable, str(root), str(CMU)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def entries(root: Path, skip: tuple[Path, ...] = ()) -> list[Path]:
    found = [root]
    for folder, dirs, files in os.walk(root):
        found += [Path(folder) / n for n in (*dirs, *files)]
    return [p for p in found if p not in skip and not p.is_symlink()]


def group_other_bits(paths: list[Path]) -> dict[str, str]:
    return {str(p): f"{stat.S_IMODE(p.lstat().st_mode):04o}" for p in paths if p.lstat().st_mode & 0o077}


@pytest.mark.parametrize("how", ["params.yaml", "HISTCODE_PRIVATE"])
def test_a_private_workspace_has_no_file_others_can_read(tmp_path, how) -> None:
    root = tmp_path / "ws"
    extra: dict[str, str] = {}
    skip: tuple[Path, ...] = ()
    if how == "params.yaml":
        root.mkdir(mode=0o755)
        (root / "params.yaml").write_text(yaml.safe_dump({"workspace": {"private": True}}))
        skip = (root, root / "params.yaml")  # the test's own, not HistCode's
    else:
        extra = {"HISTCODE_PRIVATE": "1"}
    ingest_in_a_shell(root, extra)
    written = entries(root, skip)
    assert Workspace(root).catalog_path in written and len(written) > 3
    assert group_other_bits(written) == {}


def test_secure_closes_an_open_workspace_that_doctor_named(tmp_path) -> None:
    root = tmp_path / "ws"
    ingest_in_a_shell(root, {"HISTCODE_PRIVATE": "0"})
    ws = Workspace(root)
    assert group_other_bits([ws.catalog_path, root])  # the shared default: readable by others

    doctor = invoke(root, "doctor", "--area", "exposure")
    text = flat(doctor.output)
    assert doctor.exit_code == 0, doctor.output  # a warning, not a failure
    assert "WARN exposure: permissions of" in text and str(ws.catalog_path) in text
    assert "histcode workspace secure" in text and "workspace.private: true" in text

    secured = invoke(root, "workspace", "secure")
    assert secured.exit_code == 0, secured.output
    assert "made owner-only" in flat(secured.output) and "workspace.private: true" in flat(secured.output)
    assert group_other_bits(entries(root)) == {}
    assert stat.S_IMODE(ws.catalog_path.stat().st_mode) == 0o600 and stat.S_IMODE(root.stat().st_mode) == 0o700

    again = invoke(root, "doctor", "--area", "exposure", "--all")
    assert "OK exposure: permissions of" in flat(again.output) and "WARN" not in again.output
    assert "binds 127.0.0.1 by default" in flat(again.output) and "--public" in again.output
    assert "0 of" in flat(invoke(root, "workspace", "secure").output)  # nothing left to change


# --- weights: digests and the Hugging Face cache ---

timm = pytest.importorskip("timm")


@pytest.fixture
def tiny_spec(monkeypatch):
    """A one-block ViT as a registry entry (the real registry dict, one entry added for the test)."""
    from histcode.ssl import foundation

    spec = foundation.FoundationSpec(
        "tiny-vit", "Tiny ViT", "tests", "https://example.org/tiny-vit", "tests/tiny-vit", "test only",
        "vit_small_patch16_224", {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2},
        dim=32, input_px=32, weight_files=("model.safetensors",), weight_format="safetensors (timm)")
    monkeypatch.setitem(foundation.FOUNDATION, spec.name, spec)
    return spec


def publish(spec, seed: int) -> bytes:
    """The entry's weights as a safetensors file's bytes (random, one per seed)."""
    import torch
    from safetensors.torch import save

    from histcode.ssl.foundation import build_foundation, timm_module

    torch.manual_seed(seed)
    state = timm_module(build_foundation(spec.name)).state_dict()
    return save({k: v.contiguous() for k, v in state.items()})


def hf_cache(root: Path, spec, content: bytes, blob_name: str | None = None) -> Path:
    """The layout huggingface_hub writes: blobs named by their sha256, a snapshot file linking to its blob."""
    entry = root / ("models--" + spec.hf_repo.replace("/", "--"))
    blob = entry / "blobs" / (blob_name or hashlib.sha256(content).hexdigest())
    snapshot = entry / "snapshots" / "0123abcd"
    blob.parent.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abcd")
    blob.write_bytes(content)
    (snapshot / spec.weight_files[0]).symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot / spec.weight_files[0]


def version_tags(root: Path) -> list[dict]:
    from mlflow import MlflowClient

    uri = Workspace(root).mlflow_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return [v.tags for v in sorted(client.search_model_versions("name = 'histcode-encoder'"), key=lambda v: int(v.version))]


def test_a_tampered_cache_blob_is_refused_by_name_and_nothing_is_registered(tmp_path, tiny_spec) -> None:
    good = publish(tiny_spec, 0)
    file = hf_cache(tmp_path / "hf", tiny_spec, good[:-64] + bytes(64), blob_name=hashlib.sha256(good).hexdigest())
    result = invoke(tmp_path / "ws", "encoders", "register", "tiny-vit", "--weights", tmp_path / "hf",
                    "--allow-other-weights")  # no override for a cache that lies about its content
    text = flat(result.output)
    assert result.exit_code == 2, result.output
    assert str(file) in text and "is not what the Hugging Face cache says it is" in text
    assert hashlib.sha256(good).hexdigest() in text and hashlib.sha256(file.read_bytes()).hexdigest() in text
    assert not (tmp_path / "ws" / "mlruns" / "mlflow.db").exists()


def test_weights_other_than_the_published_ones_need_an_override_that_the_version_carries(tmp_path, tiny_spec,
                                                                                         monkeypatch) -> None:
    from histcode.ssl import foundation

    published, mine = publish(tiny_spec, 0), publish(tiny_spec, 1)
    expected = hashlib.sha256(published).hexdigest()
    monkeypatch.setitem(foundation.FOUNDATION, "tiny-vit",
                        dataclasses.replace(tiny_spec, sha256={"model.safetensors": (expected,)}))
    file = hf_cache(tmp_path / "hf", tiny_spec, mine)  # a whole cache entry, of other weights
    root = tmp_path / "ws"

    refused = invoke(root, "encoders", "register", "tiny-vit", "--weights", tmp_path / "hf")
    text = flat(refused.output)
    assert refused.exit_code == 2, refused.output
    assert str(file) in text and hashlib.sha256(mine).hexdigest() in text and expected in text
    assert "--allow-other-weights" in text and not (root / "mlruns" / "mlflow.db").exists()

    taken = invoke(root, "encoders", "register", "tiny-vit", "--weights", tmp_path / "hf", "--allow-other-weights")
    assert taken.exit_code == 0, taken.output
    assert "differs from the published Tiny ViT weights" in flat(taken.output)
    assert "registered as histcode-encoder version 1" in flat(taken.output)
    assert version_tags(root)[0]["weights_check"] == "override"

    doctor = flat(invoke(root, "doctor", "--area", "exposure").output)
    assert "histcode-encoder version 1 (tiny-vit)" in doctor and "registered with --allow-other-weights" in doctor

    (tmp_path / "published.safetensors").write_bytes(published)
    verified = invoke(root, "encoders", "register", "tiny-vit", "--weights", tmp_path / "published.safetensors",
                      "--alias", "tiny-published")
    assert verified.exit_code == 0 and "warning" not in verified.output, verified.output
    assert version_tags(root)[1]["weights_check"] == "verified"
    doctor = flat(invoke(root, "doctor", "--area", "exposure", "--all").output)
    assert f"OK exposure: histcode-encoder version 2 (tiny-vit) weights verified: sha256 {expected}" in doctor


def test_weights_without_a_published_digest_register_with_a_warning(tmp_path, tiny_spec) -> None:
    content = publish(tiny_spec, 2)
    hf_cache(tmp_path / "hf", tiny_spec, content)
    result = invoke(tmp_path / "ws", "encoders", "register", "tiny-vit", "--weights", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert (f"no published digest known for tiny-vit: the file's sha256 is {hashlib.sha256(content).hexdigest()}; "
            "check it against the model card") in text
    assert version_tags(tmp_path / "ws")[0]["weights_check"] == "unknown"
