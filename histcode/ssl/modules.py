"""Registered encoders as trainable modules: the recipe that rebuilds one and its weights, beside the export.

A registered encoder version holds a ``torch.export`` program (what ``embed`` runs: fast, but an inference graph
that cannot be put in train mode or fine-tuned) and, in the artifact folder ``encoder_module`` of its run, the
recipe (``recipe.json``: the encoder name, ``resnet18_l3`` or ``foundation:uni``) and the state dict
(``state.pt``) that rebuild it as an ordinary ``nn.Module``. ``histcode.features.registry.load_encoder`` loads
one by its registered name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from histcode.ssl.encoders import Encoder, EncoderError, build_encoder
from histcode.ssl.foundation import build_foundation

MODULE_ARTIFACT = "encoder_module"
RECIPE, STATE = "recipe.json", "state.pt"
FOUNDATION_PREFIX = "foundation:"


def build_named(name: str) -> Encoder:
    """The architecture an encoder name stands for, with random weights."""
    if name.startswith(FOUNDATION_PREFIX):
        return build_foundation(name.removeprefix(FOUNDATION_PREFIX))
    return build_encoder(name, "random")


def save_module(encoder: Encoder, folder: Path) -> Path:
    """Write the recipe and the state dict of ``encoder`` into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECIPE).write_text(json.dumps({"encoder": encoder.name, "dim": encoder.dim, "format": 1}, indent=1))
    torch.save({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}, folder / STATE)
    return folder


def load_module(folder: Path) -> Encoder:
    """The encoder saved in ``folder`` by ``save_module``, in eval mode (call ``.train()`` to fine-tune)."""
    try:
        recipe = json.loads((folder / RECIPE).read_text())
        name = recipe["encoder"]
    except (OSError, ValueError, KeyError) as exc:
        raise EncoderError(f"{folder}: no readable {RECIPE} ({exc})") from exc
    encoder = build_named(name)
    state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def log_module(tracker, run_id: str, encoder: Encoder) -> None:
    """Save ``encoder``'s recipe and weights as the run's ``encoder_module`` artifact (``tracker``: a Tracker)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="encoder-module-") as tmp:
        tracker.log_artifacts(run_id, save_module(encoder, Path(tmp) / MODULE_ARTIFACT), MODULE_ARTIFACT)
