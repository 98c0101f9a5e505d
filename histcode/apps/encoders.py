"""Foundation encoders from local weights as registered encoder versions, and the list of what there is.

``register_foundation`` builds a registry entry's architecture (``histcode.ssl.foundation``), loads the published
weights strictly from a local file or Hugging Face cache (``histcode.ssl.weights``), checks one forward pass, and
logs it as one MLflow run in experiment ``encoders``: the entry as params, the module (recipe + weights, so it
loads back as an ``nn.Module``) and the exported program, registered as a new version of ``histcode-encoder``
(``pretrain.register_as``) with alias ``<name>`` and the tags ``embed`` needs (``dim``, ``image_px``, ``mpp``).
From then on ``histcode embed --encoder histcode-encoder@<name>`` makes its feature view, and search, heads and
the ablation read that view like any other. Registering the same weights again reuses the version.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from histcode.config import HistcodeConfig
from histcode.ssl.encoders import EncoderError
from histcode.ssl.foundation import FOUNDATION, build_foundation, foundation_spec
from histcode.ssl.modules import FOUNDATION_PREFIX, MODULE_ARTIFACT, STATE, log_module
from histcode.ssl.stain_norm import NONE, describe as describe_stain_norm
from histcode.ssl.weights import load_published, locate_weights, read_state_dict, verify_weights
from histcode.tracking import Tracker, quote
from histcode.workspace import Workspace
from histcode.wsi.files import file_sha256

log = logging.getLogger(__name__)

EXPERIMENT = "encoders"


@dataclass
class Registered:
    name: str  # the registry entry
    model_name: str
    version: str
    alias: str
    weights: Path
    sha256: str
    mpp: float
    reused: bool = False
    weights_check: str = "unknown"  # verified | unknown | override (histcode.ssl.weights.verify_weights)
    weights_note: str = ""

    @property
    def ref(self) -> str:
        return f"{self.model_name}@{self.alias}"


def alias_of(name: str) -> str:
    """A registry name as an MLflow alias (letters, digits, ``_`` and ``-``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _existing(tracker: Tracker, model_name: str, encoder: str, sha: str, mpp: float, reading: str) -> str | None:
    try:
        versions = tracker.client.search_model_versions(f"name = {quote(model_name)}")
    except Exception:  # noqa: BLE001 -- no such registered model yet
        return None
    for v in versions:
        tags = v.tags or {}
        if (tags.get("encoder") == encoder and tags.get("weights_sha256") == sha and tags.get("mpp") == str(mpp)
                and (tags.get("stain_norm") or NONE) == reading):
            return str(v.version)
    return None


def _discard_run(tracker: Tracker, run_id: str) -> None:
    """Delete what a registration that failed half-way made: the model versions of its run, its logged model and
    the run, with their artifacts (each a copy of the weights, gigabytes for the large encoders). Best effort:
    a cleanup error is logged, never raised over the error that caused it."""
    import shutil
    from urllib.parse import unquote, urlparse

    client = tracker.client

    def remove(uri: str | None, run_folder: bool = False) -> None:
        if uri and uri.startswith("file:"):
            folder = Path(unquote(urlparse(uri).path))
            if folder.name == "artifacts" and (not run_folder or folder.parent.name == run_id):
                folder = folder.parent  # the run's (or logged model's) own folder, not only its artifacts
            shutil.rmtree(folder, ignore_errors=True)

    try:
        for v in client.search_model_versions(f"run_id = {quote(run_id)}"):
            client.delete_model_version(v.name, v.version)
        run = client.get_run(run_id)
        for model in client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = {quote(run_id)}"):
            remove(model.artifact_location)
            client.delete_logged_model(model.model_id)
        tracker.end_run(run_id, "FAILED")
        client.delete_run(run_id)
        remove(run.info.artifact_uri, run_folder=True)
    except Exception as exc:  # noqa: BLE001 -- cleanup must not hide the failure that called it
        log.warning("could not clean up the failed registration run %s: %s", run_id, exc)


RESERVED_ALIASES = ("random", "colour", "simclr", "moco", "adco", "best", "latest")


def register_foundation(ws: Workspace, cfg: HistcodeConfig, name: str, weights: Path, mpp: float | None = None,
                        alias: str | None = None, force: bool = False, stain_norm: bool = False,
                        allow_other_weights: bool = False) -> Registered:
    """``stain_norm``: its feature views read slide tiles through ``pretrain.stain_norm`` (as the encoders trained
    here do, so that an ablation compares encoders alone); by default tiles are read as they are, as the
    published encoders were trained. The file's SHA-256 is compared with the entry's published digests before
    anything is written (``verify_weights``): a different file is refused unless ``allow_other_weights``, which
    the version then carries as its ``weights_check=override`` tag."""
    spec = foundation_spec(name)
    path = locate_weights(spec, weights)
    mpp = float(mpp if mpp is not None else spec.mpp)
    if mpp <= 0:
        raise EncoderError(f"--mpp must be positive, got {mpp}")
    alias = alias_of(alias or spec.name)
    if alias in RESERVED_ALIASES:
        raise EncoderError(f"alias {alias!r} is reserved for the encoders HistCode trains (and MLflow's 'latest'); "
                           "choose another with --alias")
    log.info("%s: hashing %s", spec.title, path)
    sha = file_sha256(path, 1 << 24)
    check, note = verify_weights(spec, path, sha, allow_other_weights)
    (log.info if check == "verified" else log.warning)("%s", note)
    tracker, model_name, encoder_name = Tracker(ws), cfg.pretrain.register_as, FOUNDATION_PREFIX + spec.name
    reading = describe_stain_norm(cfg.pretrain.stain_norm) if stain_norm else NONE
    version = None if force else _existing(tracker, model_name, encoder_name, sha, mpp, reading)
    if version is not None:
        tracker.client.set_registered_model_alias(model_name, alias, version)
        tracker.client.set_model_version_tag(model_name, version, "weights_check", check)
        log.info("%s is already %s version %s (same weights and mpp); alias %s points at it", spec.title, model_name,
                 version, alias)
        return Registered(spec.name, model_name, version, alias, path, sha, mpp, True, check, note)

    encoder = build_foundation(spec.name, weightless=True)  # the file's tensors become the weights: no copy
    load_published(spec, encoder, read_state_dict(path), str(path))
    encoder = encoder.eval()
    with torch.inference_mode():
        out = encoder(torch.rand(2, 3, spec.input_px, spec.input_px))
    if tuple(out.shape) != (2, spec.dim) or not torch.isfinite(out).all():
        raise EncoderError(f"{spec.title} from {path}: a test forward gave shape {tuple(out.shape)} "
                           f"(expects (2, {spec.dim})) or non-finite values")
    described = spec.describe()
    run_id = tracker.start_run(EXPERIMENT, f"foundation {spec.name}", tags={"encoder": encoder_name})
    try:
        tracker.log_params(run_id, {**described, "mpp": mpp, "weights_file": str(path), "weights_sha256": sha})
        log_module(tracker, run_id, encoder)  # the weights, once: the program below is logged without them
        _, version = tracker.log_torch_model(
            run_id, encoder, "encoder", (3, spec.input_px, spec.input_px), spec.dim, model_name, aliases=(alias,),
            version_tags={"method": encoder_name, "encoder": encoder_name, "image_px": spec.input_px, "dim": spec.dim,
                          "mpp": mpp, "run_id": run_id, "licence": spec.licence, "card": spec.card,
                          "weights_sha256": sha, "weights_file": str(path), "stain_norm": reading,
                          "weights_check": check},
            weights_artifact=f"{MODULE_ARTIFACT}/{STATE}",
        )
    except BaseException:
        _discard_run(tracker, run_id)  # a half-registered encoder leaves no run and no copy of its weights behind
        raise
    tracker.end_run(run_id)
    log.info("registered %s as %s version %s (alias %s)", spec.title, model_name, version, alias)
    return Registered(spec.name, model_name, str(version), alias, path, sha, mpp, False, check, note)


def registered_encoders(ws: Workspace, cfg: HistcodeConfig) -> list[dict]:
    """Every version of the encoder model in this workspace, trained here or a foundation encoder."""
    tracker = Tracker(ws)
    name = cfg.pretrain.register_as
    try:
        versions = tracker.client.search_model_versions(f"name = {quote(name)}")
    except Exception:  # noqa: BLE001 -- nothing registered yet
        return []
    aliases: dict[str, list[str]] = {}
    try:
        for alias, version in (tracker.client.get_registered_model(name).aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
    except Exception:  # noqa: BLE001 -- a registered model without aliases
        pass
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version)):
        tags = v.tags or {}
        rows.append({"model": name, "version": str(v.version), "aliases": ",".join(sorted(aliases.get(str(v.version), []))),
                     "encoder": tags.get("encoder", ""), "method": tags.get("method", ""), "dim": tags.get("dim", ""),
                     "image_px": tags.get("image_px", ""), "mpp": tags.get("mpp", ""),
                     "weights_check": tags.get("weights_check", "")})
    return rows


def catalogue() -> list[dict]:
    """The foundation registry, one row per entry."""
    return [FOUNDATION[n].describe() for n in FOUNDATION]


def slide_catalogue() -> list[dict]:
    """The slide encoder registry (``histcode.ssl.slide_encoders``), one row per entry, refused ones included."""
    from histcode.ssl.slide_encoders import SLIDE_ENCODERS

    return [s.describe() for s in SLIDE_ENCODERS.values()]


def embed_with_slide_encoder(ws: Workspace, cfg: HistcodeConfig, name: str, weights: Path, view: str | None = None,
                             slide_ids: list[str] | None = None):
    """A slide encoder's vectors of every slide of a tile view, as a slide-level feature view
    (``histcode.features.slide_embed.embed_slides``); returns its ``SlideEmbedReport``."""
    from histcode.features.slide_embed import embed_slides

    return embed_slides(ws, cfg, name, weights, source_view=view, slide_ids=slide_ids)
