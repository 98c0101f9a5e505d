"""Encoders and their weights: every registered encoder version can be loaded, every feature view's encoder
version still exists, the configured encoder resolves, and weight files named on the command line are usable.

An encoder version's weights are stored once, as its run's ``encoder_module/state.pt`` (the exported program
refers to them); a version whose file is gone cannot embed, so it fails here by name. A weight file named with
``--weights NAME=PATH`` is read as ``histcode encoders register`` would read it: located (a file or a Hugging
Face cache folder), and loaded strictly into the architecture built on the meta device (no memory for the
weights' copy), so a wrong or truncated file is found before a registration or a long run.
"""

from __future__ import annotations

from pathlib import Path

from histcode.config import HistcodeConfig
from histcode.doctor.finding import FAIL, OK, WARN, Finding

AREA = "encoders"
WEIGHTS = "encoder_module/state.pt"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _artifact_paths(client, run_id: str, folder: str | None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, folder)}


def _model_files(client, model_id: str | None) -> set[str] | None:
    if not model_id:
        return None
    return {a.path for a in client.list_logged_model_artifacts(model_id)}


def registered_version_checks(client, cfg: HistcodeConfig) -> list[Finding]:
    """Each version of the encoder model (``pretrain.register_as``): its weights file and its program."""
    from histcode.tracking import quote

    name = cfg.pretrain.register_as
    try:
        versions = client.search_model_versions(f"name = {quote(name)}")
    except Exception as exc:  # noqa: BLE001 -- MLflow raises many types for an unreadable store
        return [Finding(AREA, name, FAIL, f"versions cannot be listed: {_first_line(exc)}")]
    if not versions:
        return [Finding(AREA, name, WARN, "no encoder registered", "`histcode pretrain` or `histcode encoders register`")]
    out = []
    for v in sorted(versions, key=lambda v: int(v.version)):
        tags = v.tags or {}
        item = f"{name}/{v.version} ({tags.get('encoder') or tags.get('method') or 'encoder'})"
        fix = (f"register it again: `histcode encoders register {tags['encoder'].split(':', 1)[-1]} --weights PATH "
               "--force`" if tags.get("encoder", "").startswith("foundation:") else
               "train it again (`histcode pretrain`) or restore mlruns/ from your backup or DVC")
        try:
            if WEIGHTS not in _artifact_paths(client, v.run_id, "encoder_module"):
                out.append(Finding(AREA, item, FAIL, f"its weights, run {v.run_id}'s artifact {WEIGHTS}, are missing",
                                   fix))
                continue
            files = _model_files(client, getattr(v, "model_id", None))
        except Exception as exc:  # noqa: BLE001
            out.append(Finding(AREA, item, FAIL, f"its artifacts cannot be listed: {_first_line(exc)}", fix))
            continue
        if files is not None and "MLmodel" not in files:
            out.append(Finding(AREA, item, FAIL, f"its logged program (model {v.model_id}) has no MLmodel file", fix))
            continue
        out.append(Finding(AREA, item, OK, f"weights and program present (dim {tags.get('dim', '?')}, "
                           f"{tags.get('image_px', '?')} px, mpp {tags.get('mpp') or 'the tiling spec'})"))
    return out


def view_encoder_checks(client, views: list[dict]) -> list[Finding]:
    """A view whose encoder version is gone can still be read, but nothing new can be embedded into it."""
    out = []
    for view in (v for v in views if v["kind"] == "tile"):
        item = f"view {view['view_id']}"
        try:
            client.get_model_version(view["model_name"], str(view["model_version"]))
        except Exception:  # noqa: BLE001 -- MLflow's RestException / MlflowException for a missing version
            out.append(Finding(AREA, item, FAIL, f"its encoder {view['model_name']}/{view['model_version']} is no "
                               "longer registered: its vectors can be read, new slides cannot be embedded",
                               "register the encoder again, or drop the view"))
            continue
        out.append(Finding(AREA, item, OK, f"encoder {view['model_name']}/{view['model_version']} ({view['status']})"))
    return out


def configured_encoder_check(client, cfg: HistcodeConfig) -> Finding:
    from histcode.features.registry import REF

    ref = cfg.features.encoder
    item = f"features.encoder = {ref}"
    match = REF.match(ref)
    if not match:
        return Finding(AREA, item, FAIL, "not a registered model reference (name@alias, name/3 or name)",
                       "fix features.encoder in params.yaml")
    try:
        if match["alias"]:
            v = client.get_model_version_by_alias(match["name"], match["alias"])
        elif match["version"] and match["version"] != "latest":
            v = client.get_model_version(match["name"], match["version"])
        else:
            found = client.search_model_versions(f"name = '{match['name']}'")
            if not found:
                raise LookupError(match["name"])
            v = max(found, key=lambda x: int(x.version))
    except Exception:  # noqa: BLE001
        return Finding(AREA, item, WARN, "resolves to no registered version yet: `histcode embed` cannot run",
                       "`histcode pretrain`, or `histcode encoders register NAME --weights PATH` and set "
                       "features.encoder")
    return Finding(AREA, item, OK, f"resolves to {v.name}/{v.version}")


def weight_file_check(name: str, path: Path) -> Finding:
    """A foundation encoder's weight file, read as registration reads it."""
    from histcode.ssl.foundation import build_foundation, foundation_spec
    from histcode.ssl.weights import load_published, locate_weights, read_state_dict

    item = f"weights {name} = {path}"
    try:
        spec = foundation_spec(name)
    except Exception as exc:  # noqa: BLE001 -- an unknown name: the error lists the known ones
        return Finding(AREA, item, FAIL, _first_line(exc), "`histcode encoders list` names the known encoders")
    try:
        located = locate_weights(spec, path)
    except Exception as exc:  # noqa: BLE001
        return Finding(AREA, item, FAIL, _first_line(exc),
                       f"download {', '.join(spec.weight_files)} from {spec.card} (accept its terms) and give its path")
    try:
        encoder = build_foundation(spec.name, weightless=True)
        load_published(spec, encoder, read_state_dict(located), str(located))
    except Exception as exc:  # noqa: BLE001 -- torch and safetensors raise many types for a wrong file
        return Finding(AREA, item, FAIL, f"{located}: {_first_line(exc)}",
                       f"this is not {spec.title}'s published state dict: download it again from {spec.card}")
    return Finding(AREA, item, OK, f"{located}: every key of {spec.title} present ({spec.dim}-d, {spec.input_px} px)")
