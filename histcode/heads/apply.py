"""Registered heads, loaded back and applied to bags of tile vectors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from histcode.errors import HistcodeError
from histcode.heads.names import MODEL_NAMES
from histcode.tracking import Tracker

log = logging.getLogger(__name__)


class HeadNotFound(HistcodeError, LookupError):
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
    load: Callable[[], object]  # the registered module, loaded on first use (a rerun that finds its work done
    # reads the registry's tags only: loading an exported model costs ~3 s)
    classified_genes: tuple[str, ...] = ()  # DE: genes with large enough classes (the gate's exclusions left out)
    _model: object = field(default=None, init=False, repr=False)

    @property
    def model(self) -> object:
        if self._model is None:
            self._model = self.load()
        return self._model

    def _run(self, features: np.ndarray) -> tuple:
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))

    def __call__(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._run(features)
        return out[0].numpy(), out[1].numpy()

    def tile_scores(self, features: np.ndarray) -> np.ndarray:
        """Each tile scored alone (as a bag of one), all tiles in one pass: class probabilities (n, classes), or
        for DE heads each tile's predicted log2FC per gene (n, genes). Heads registered before the per-tile
        output existed (their export returns two tensors) are run once per tile."""
        out = self._run(features)
        if len(out) > 2:
            return out[2].numpy()
        single = [self(features[i:i + 1])[0] for i in range(len(features))]
        return np.stack([o[:, 0] if self.task == "de" else o for o in single])


def load_head(tracker: Tracker, task: str, alias: str = "best") -> LoadedHead:
    name = MODEL_NAMES[task]
    try:
        mv = tracker.client.get_model_version_by_alias(name, alias)
    except Exception as exc:  # noqa: BLE001 -- MLflow's own exception types
        raise HeadNotFound(f"no {name}@{alias} in the registry: run `histcode heads` first") from exc
    tags = mv.tags
    uri = f"models:/{name}/{mv.version}"
    split = lambda key: tuple(t for t in tags.get(key, "").split(",") if t)  # noqa: E731
    return LoadedHead(task, str(mv.version), tags.get("aggregator", ""), tags["view_id"], tags["encoder_uri"],
                      split("classes"), split("genes"), lambda: tracker.load_model(uri), split("classified_genes"))


def optional_head(tracker: Tracker, task: str, alias: str = "best") -> LoadedHead | None:
    """The registered head, or None (logged) when there is none: callers leave its outputs empty."""
    try:
        return load_head(tracker, task, alias)
    except HeadNotFound:
        log.warning("no registered %s head (%s@%s): its outputs stay empty", task, MODEL_NAMES[task], alias)
        return None
