"""Stain normalisation as an encoder's input contract: estimated per slide, recorded with the encoder.

A slide's stain is estimated once (Macenko, ``histcode.wsi.stain``) from up to ``sample_tiles`` of its tiles,
spread evenly over its tile list, and every tile the dataset yields is mapped onto the reference stain; with
``white_point`` the slide's glass white (``estimate_white``) is first taken out of every pixel's OD, and the
stain is estimated on the white-balanced pixels. The
setting travels with the registered encoder as the ``stain_norm`` version tag (``describe`` / ``parse``), so
materialisation reads tiles exactly as pretraining did. A slide with too little stained tissue to estimate
from is left as read, with a warning naming it.

Loose tiles (the probe's, a query image) are not normalised: Macenko needs both stains' extremes, and one
homogeneous tile (all tumour, or all alveolar wall) rarely shows them, so its estimate distorts the tile. On
the probe's LC25000 tiles, per-tile normalisation lowered a 240-step AdCo encoder's macro AUC from 0.958 to
0.923 (as they are) and from 0.936 to 0.886 (re-stained); the encoder, trained with stain jitter, reads raw
tiles better.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
from histcode.config import StainNormConfig
from histcode.ssl.dataset import TileDataset
from histcode.wsi.reader import SlideReadError
from histcode.wsi.stain import StainError, estimate_stain, estimate_white, od_to_rgb, rgb_to_od, white_balance

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
        settings = json.loads(tag)
        settings.setdefault("white_point", False)  # registered before the white point was an option
        return StainNormConfig(**settings)
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
            white = estimate_white(pixels) if cfg.white_point else None
            if white is not None:
                pixels = od_to_rgb(white_balance(rgb_to_od(pixels), white))
            estimate = estimate_stain(pixels, cfg.beta, cfg.alpha)
        except (StainError, SlideReadError, OSError, ValueError) as exc:  # a broken slide fails later, where it is read
            log.warning("stain normalisation: slide %s is read as it is: %s", source.slide_id, exc)
            skipped[source.slide_id] = str(exc)
            continue
        stain = estimate.to_reference().ravel().tolist() + ([] if white is None else white.tolist())
        dataset.slides[index] = dataclasses.replace(source, stain=tuple(float(v) for v in stain))
    dataset.close()  # the readers opened here stay in this process; workers open their own
    log.info("stain normalisation (%s): %d slides mapped onto the reference, %d read as they are", cfg.method,
             len(slides) - len(skipped), len(skipped))
    return skipped
