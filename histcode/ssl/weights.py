"""Published encoder weights from this machine: find the file, read it, convert its keys, load it strictly.

Weights come from a local file or a folder: the folder may hold the file itself, be a Hugging Face cache entry
(``models--org--name`` with ``snapshots/<revision>/<file>``) or the cache root above such entries (``~/.cache/
huggingface/hub``). Nothing is downloaded; a missing file is an error that names the files looked for, the
folders searched and where the authors publish them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from histcode.ssl.encoders import Encoder, EncoderError
from histcode.ssl.foundation import FoundationSpec, timm_module

log = logging.getLogger(__name__)


def _snapshots(entry: Path) -> list[Path]:
    """A Hugging Face cache entry's snapshot folders, the one ``refs/main`` names first."""
    snaps = sorted((entry / "snapshots").glob("*")) if (entry / "snapshots").is_dir() else []
    ref = entry / "refs" / "main"
    if ref.is_file():
        main = entry / "snapshots" / ref.read_text().strip()
        snaps = [main] + [s for s in snaps if s != main] if main.is_dir() else snaps
    return snaps


def locate_weights(spec: FoundationSpec, path: Path) -> Path:
    """The weight file of ``spec`` at ``path`` (a file, a folder holding it, or a Hugging Face cache)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    searched = [path]
    if path.is_dir():
        if spec.hf_repo:
            cache_name = "models--" + spec.hf_repo.replace("/", "--")
            for entry in (path, path / cache_name, path / "hub" / cache_name):
                searched += _snapshots(entry)
        for folder in searched:
            for name in spec.weight_files:
                if (folder / name).is_file():
                    return folder / name
    where = f"huggingface.co/{spec.hf_repo}" if spec.hf_repo else spec.card
    fetch = (f"`huggingface-cli download {spec.hf_repo} {spec.weight_files[0]} --local-dir DIR` on a machine with "
             "internet, after accepting the terms on the model card, ") if spec.hf_repo else ""
    looked = ", ".join(str(s) for s in searched[:4]) + (" ..." if len(searched) > 4 else "")
    state = "does not exist" if not path.exists() else "holds none of them"
    raise EncoderError(
        f"{spec.title} weights not found: {path} {state}. Looked for {' or '.join(spec.weight_files)} in {looked}. "
        f"Get them from their authors ({where}; {spec.licence}), e.g. {fetch}then pass --weights DIR or the file. "
        "Nothing is downloaded here.")


SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
ALLOW_OTHER = "--allow-other-weights"


def cache_blob_digest(path: Path) -> str | None:
    """The SHA-256 a Hugging Face cache names ``path``'s content by, or None when it is not a cache file: a
    snapshot file links to ``models--org--name/blobs/<sha256>`` (large files; small ones are named by their git
    hash, 40 characters, and are not checked), or the path is such a blob itself."""
    target = Path(path).resolve()
    if target.parent.name == "blobs" and target.parent.parent.name.startswith("models--") and SHA256_HEX.match(target.name):
        return target.name
    return None


def check_cache_blob(path: Path, sha: str) -> None:
    """Refuse a Hugging Face cache file whose content is not the blob its name promises (tampered, truncated,
    or a download that did not finish): EncoderError naming the file, both digests and the fix."""
    named = cache_blob_digest(path)
    if named is not None and named != sha:
        raise EncoderError(
            f"{path} is not what the Hugging Face cache says it is: its blob {Path(path).resolve()} is named by "
            f"sha256 {named} but its content hashes to {sha} (tampered, truncated or half downloaded). Delete the "
            "blob and download the weights again on a machine with internet.")


def known_digests(spec: FoundationSpec, path: Path) -> tuple[str, ...]:
    """The published SHA-256 digests the file at ``path`` may have: those of its name when it has a published
    file's name, else (a renamed copy) those of every published file of the entry; () when none is known."""
    if path.name in spec.weight_files:
        return spec.sha256.get(path.name, ())
    return tuple(d for digests in spec.sha256.values() for d in digests)


def verify_weights(spec: FoundationSpec, path: Path, sha: str, allow_other: bool = False) -> tuple[str, str]:
    """(status, what to tell) for ``spec``'s weight file ``path`` of content digest ``sha``: ``verified`` (it is a
    published file), ``unknown`` (no published digest is known: check it against the model card yourself) or
    ``override`` (it differs from the published digests and ``allow_other`` accepts it). A file that differs
    without ``allow_other`` is refused (EncoderError naming the file, its digest and the expected ones); so is a
    Hugging Face cache file whose content is not the blob it is named by, whatever ``allow_other`` says."""
    check_cache_blob(path, sha)
    known = known_digests(spec, path)
    if not known:
        return "unknown", (f"no published digest known for {spec.name}: the file's sha256 is {sha}; check it "
                           f"against the model card ({spec.card})")
    if sha in known:
        return "verified", f"{path}: sha256 {sha} is the published {spec.title} weights"
    expected = " or ".join(known)
    if not allow_other:
        raise EncoderError(
            f"{path} is not the published {spec.title} weights: its sha256 is {sha}, the published file's is "
            f"{expected}. Get the file from {spec.card}, or pass {ALLOW_OTHER} to register these weights anyway "
            "(e.g. a fine-tuned copy); the version is then tagged weights_check=override.")
    return "override", (f"{path}: sha256 {sha} differs from the published {spec.title} weights ({expected}); "
                        f"registered anyway ({ALLOW_OTHER})")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors by name from a safetensors file or a torch checkpoint (loaded with ``weights_only``); a
    checkpoint that wraps its state dict under ``model``/``state_dict`` is unwrapped, ``module.`` stripped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # the pre-1.6 (non-zip) format cannot be memory-mapped: read it whole
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch and safetensors raise many types for a bad file
        raise EncoderError(f"{path}: not a readable weight file ({type(exc).__name__}: {exc})") from exc
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and len(state) <= 4:
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(f"{path}: holds no state dict of tensors (found {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


HF_DINOV2 = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc(\d)\.", r"blocks.\1.mlp.fc\2."),
    (r"^layernorm\.", "norm."),
)
QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def hf_dinov2_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``Dinov2Model`` state dict in timm's ViT names: query, key and value are stacked into one
    ``qkv`` projection in that order, the mask token (used only in training) is dropped."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("dinov2.")
        if key == "embeddings.mask_token":
            continue
        match = QKV.match(key)
        if match:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
            continue
        for pattern, repl in HF_DINOV2:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise EncoderError(f"layer {layer}: {kind} of query/key/value incomplete (has {sorted(parts)})")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def _fit_pos_embed(state: dict[str, torch.Tensor], key: str, model: nn.Module) -> None:
    """Resample a ViT's absolute position embedding to the model's patch grid (published at another size)."""
    if key not in state or state[key].shape == model.pos_embed.shape:
        return
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    state[key] = resample_abs_pos_embed(state[key], list(model.patch_embed.grid_size), num_prefix_tokens=prefix)


def convert(spec: FoundationSpec, state: dict[str, torch.Tensor], encoder: Encoder) -> tuple[nn.Module, dict]:
    """The module the published state dict loads into, and the state dict in that module's names."""
    backbone = encoder.backbone
    if spec.key_layout == "swin-original":
        from timm.models.swin_transformer import checkpoint_filter_fn

        return backbone, checkpoint_filter_fn(dict(state), backbone)
    if spec.key_layout == "conch-vision":
        state = dict(state)
        _fit_pos_embed(state, "trunk.pos_embed", backbone.trunk)
        return backbone, state
    target = timm_module(encoder)
    state = hf_dinov2_to_timm(state) if spec.key_layout == "hf-dinov2" else dict(state)
    _fit_pos_embed(state, "pos_embed", target)
    return target, state


def _load_strictly(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> tuple[bool, dict]:
    """``load_state_dict(strict=True)`` with the refusal told in full: ``what`` followed by the missing, unexpected
    and wrongly shaped keys (five of each named). A module built on meta gets the tensors assigned, each cast to
    the module's dtype (a half-precision release becomes float32 like the module). Returns (assigned, the
    tensors loaded)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expects {tuple(expected[k].shape)})"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        def few(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
        problems = [f"{len(missing)} missing ({few(missing)})" if missing else "",
                    f"{len(unexpected)} unexpected ({few(unexpected)})" if unexpected else "",
                    f"{len(wrong)} of another shape ({few(wrong)})" if wrong else ""]
        raise EncoderError(f"{what}: " + "; ".join(p for p in problems if p))
    assign = any(p.is_meta for p in module.parameters())
    if assign:
        state = {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)
    return assign, state


def load_published(spec: FoundationSpec, encoder: Encoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a published state dict into a built encoder, strictly: every weight the architecture has must be in
    the file with its shape, and nothing else (buffers the architecture recomputes aside)."""
    module, converted = convert(spec, state, encoder)
    assign, converted = _load_strictly(module, converted,
                                       f"{source} does not fit {spec.title} ({spec.timm_model}, {spec.key_layout} keys)")
    if assign and not all(t.is_meta for t in converted.values()):
        left = [n for n, t in [*encoder.named_parameters(), *encoder.named_buffers()] if t.is_meta]
        if left:
            raise EncoderError(f"{source}: {spec.title} built without memory still has {len(left)} tensors the file "
                               f"does not fill ({', '.join(left[:5])}); build it on the CPU instead")
    log.info("%s: loaded %d tensors from %s", spec.title, len(converted), source)


def load_slide_encoder(spec, module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a published slide encoder's state dict (``spec``: a ``SlideEncoderSpec``) into ``module``, strictly:
    every weight of the slide-embedding part must be in the file with its shape; the only other keys allowed
    are those under the entry's ``skipped`` prefixes (a text decoder, classifiers: listed, counted, not loaded);
    anything else is an error naming the file and the keys. A tensor the architecture shares across layers may be
    stored under its first name only (``slide_encoders.fill_shared``)."""
    from histcode.ssl.slide_encoders import fill_shared

    skipped = sorted(k for k in state if any(k.startswith(p) for p in spec.skipped))
    used = fill_shared(module, {k: v for k, v in state.items() if k not in set(skipped)}, source)
    assign, used = _load_strictly(module, used, f"{source} does not fit slide encoder {spec.title} ({spec.key_layout})")
    if skipped:
        log.info("%s: %d tensors of %s skipped (not the slide embedding: %s)", source, len(skipped), spec.title,
                 ", ".join(spec.skipped))
    log.info("%s: loaded %d tensors from %s", spec.title, len(used), source)
