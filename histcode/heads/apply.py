"""Registered heads, loaded back and applied to bags of tile vectors."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from histcode.heads.names import MODEL_NAMES
from histcode.tracking import Tracker

log = logging.getLogger(__name__)


class HeadNotFound(LookupError):
    """No registered head under that name and alias; the message says what to run."""


@dataclass
class LoadedHead:
    task: str
    version: str
    aggregator: str
    view_id: str
    encoder_uri: str
    classes: tuple[str, ...]
    genes: tuple[str, ...]
    model: object
    classified_genes: tuple[str, ...] = ()  # DE: genes with large enough classes (the gate's exclusions left out)

    def __call__(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            out, att = self.model(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        return out.numpy(), att.numpy()

    def tile_scores(self, features: np.ndarray) -> np.ndarray:
        """DE heads: each tile's predicted log2FC per gene, from the tile alone (a bag of one): (n, genes)."""
        return np.stack([self(features[i:i + 1])[0][:, 0] for i in range(len(features))])


def load_head(tracker: Tracker, task: str, alias: str = "best") -> LoadedHead:
    name = MODEL_NAMES[task]
    try:
        mv = tracker.client.get_model_version_by_alias(name, alias)
    except Exception as exc:  # noqa: BLE001 -- MLflow's own exception types
        raise HeadNotFound(f"no {name}@{alias} in the registry: run `histcode heads` first") from exc
    tags = mv.tags
    model = tracker.load_model(f"models:/{name}/{mv.version}")
    split = lambda key: tuple(t for t in tags.get(key, "").split(",") if t)  # noqa: E731
    return LoadedHead(task, str(mv.version), tags.get("aggregator", ""), tags["view_id"], tags["encoder_uri"],
                      split("classes"), split("genes"), model, split("classified_genes"))


def optional_head(tracker: Tracker, task: str, alias: str = "best") -> LoadedHead | None:
    """The registered head, or None (logged) when there is none: callers leave its outputs empty."""
    try:
        return load_head(tracker, task, alias)
    except HeadNotFound:
        log.warning("no registered %s head (%s@%s): its outputs stay empty", task, MODEL_NAMES[task], alias)
        return None
