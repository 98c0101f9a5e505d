"""Stain normalisation as an encoder's input contract: estimated per slide, recorded with the encoder.

A slide's stain is estimated once (Macenko, ``histcode.wsi.stain``) from up to ``sample_tiles`` of its tiles,
spread evenly over its tile list, and every tile the dataset yields is mapped onto the reference stain. The
setting travels with the registered encoder as the ``stain_norm`` version tag (``describe`` / ``parse``), so
materialisation reads tiles exactly as pretraining did. Loose tiles (the probe) are normalised one by one.
A slide or tile with too little stained tissue to estimate from is left as read, with a warning naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import torch

from histcode.config import StainNormConfig
from histcode.ssl.dataset import TileDataset
from histcode.wsi.reader import SlideReadError
from histcode.wsi.stain import StainError, apply_od_transform, estimate_stain

log = logging.getLogger(__name__)

NONE = "none"


def describe(cfg: StainNormConfig) -> str:
    """The version-tag value: ``none`` or the JSON of the settings."""
    if cfg.method == "none":
        return NONE
    return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)


def parse(tag: str | None) -> StainNormConfig:
    """A ``stain_norm`` tag back as settings; encoders registered without one read tiles as they are."""
    if not tag or tag == NONE:
        return StainNormConfig(method="none")
    try:
        return StainNormConfig(**json.loads(tag))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"stain_norm tag {tag!r}: not a stain-normalisation setting ({exc})") from exc


def sample_indices(rows: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` of ``rows`` (dataset indices of one slide), evenly spread."""
    if len(rows) <= n:
        return rows
    return rows[np.linspace(0, len(rows) - 1, n).round().astype(int)]


def normalise_dataset(dataset: TileDataset, cfg: StainNormConfig) -> dict[str, str]:
    """Estimate each slide's stain and set its map onto the reference (in place). Returns the slides left as
    read, with the reason."""
    if cfg.method == "none":
        return {}
    skipped: dict[str, str] = {}
    slides = list(dataset.slides)
    for index, source in enumerate(slides):
        rows = sample_indices(np.flatnonzero(dataset.tiles[:, 0] == index), cfg.sample_tiles)
        raw = dataclasses.replace(source, stain=None)
        dataset.slides[index] = raw
        try:
            pixels = np.stack([dataset[int(i)].numpy().transpose(1, 2, 0) for i in rows])
            estimate = estimate_stain(pixels, cfg.beta, cfg.alpha)
        except (StainError, SlideReadError, OSError) as exc:  # a broken slide fails later, where it is embedded
            log.warning("stain normalisation: slide %s is read as it is: %s", source.slide_id, exc)
            skipped[source.slide_id] = str(exc)
            continue
        dataset.slides[index] = dataclasses.replace(source, stain=tuple(estimate.to_reference().ravel().tolist()))
    dataset.close()  # the readers opened here stay in this process; workers open their own
    return skipped


def normalise_images(images: torch.Tensor, cfg: StainNormConfig) -> torch.Tensor:
    """uint8 (N, 3, h, w) tiles, each normalised on its own stain estimate (as it is where none can be made)."""
    if cfg.method == "none":
        return images
    out = images.clone()
    failed = 0
    for i in range(len(images)):
        rgb = images[i].numpy().transpose(1, 2, 0)
        try:
            matrix = estimate_stain(rgb, cfg.beta, cfg.alpha).to_reference()
        except StainError:
            failed += 1
            continue
        out[i] = torch.from_numpy(np.ascontiguousarray(apply_od_transform(rgb, matrix).transpose(2, 0, 1)))
    if failed:
        log.warning("stain normalisation: %d of %d tiles have too little stain to estimate and are left as they are",
                    failed, len(images))
    return out
