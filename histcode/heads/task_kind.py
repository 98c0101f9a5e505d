"""The task-kind interface: what every task kind (``histcode.heads.tasks``, ``histcode.heads.survival``)
implements, the loaded task (``TaskData``), how its torch heads train (``Schedule``), and the registry ``TASKS``
of the kinds by name (filled by ``histcode.heads.tasks``, which every caller imports to load a task)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from histcode.config import HeadsConfig, LabelsConfig
from histcode.heads.data import Bag
from histcode.store.catalog import Catalog

@dataclass(frozen=True)
class Schedule:
    """How a task's torch heads train: epochs, no early stop before ``min_epochs``, ``patience``, bags per step."""

    epochs: int
    min_epochs: int
    patience: int
    bags_per_step: int


@dataclass
class TaskData:
    name: str  # tumor | subtype | de | survival: the key of its kind in TASKS
    slide_ids: list[str]
    patients: np.ndarray
    folds: np.ndarray  # the label gate's planned fold of each slide
    y: np.ndarray  # class ids (tumor, subtype); for de: log2FC (n, genes); for survival: (time, event) (n, 2)
    classes: tuple[str, ...] = ()
    genes: tuple[str, ...] = ()
    y_class: np.ndarray | None = None  # de: class ids (n, genes), -1 where the gene is not classified
    gene_included: np.ndarray | None = None
    mean_abs_log2fc: np.ndarray | None = None
    controls: np.ndarray | None = None  # de: genes expected to carry no morphological signal (scored apart)
    tumour_fraction: np.ndarray | None = None  # per slide, from the slide attribute tumour_fraction (NaN: unknown)
    notes: list[str] = field(default_factory=list)
    source: dict | None = field(default=None, repr=False)  # de: what fold-wise labels are computed from

    @property
    def kind(self) -> TaskKind:
        return TASKS[self.name]

    @property
    def n_folds(self) -> int:
        return int(self.folds.max()) + 1

    @property
    def shape(self) -> dict[str, int]:
        return {"classes": len(self.classes), "genes": len(self.genes)}


class TaskKind:
    """The interface every task kind implements."""

    name: str
    aggregators: tuple[str, ...] = ("attention", "mean", "max")
    needs_every_class = False  # training folds must hold every class (classification)

    def load(self, catalog: Catalog, bags: dict[str, Bag]) -> TaskData:
        raise NotImplementedError

    def targets(self, data: TaskData, idx: np.ndarray) -> list:
        raise NotImplementedError

    def for_fold(self, data: TaskData, k: int) -> TaskData:
        """The task as the training of outer fold ``k`` may see it (no test-fold sample in any label)."""
        return data

    def tested(self, data: TaskData) -> TaskData:
        """Each slide's targets as its own test fold's ``for_fold`` defines them."""
        return data

    def val_loss(self, data: TaskData, idx: np.ndarray, outputs: list) -> float:
        """A loss every aggregator's outputs can be compared by (ties of the selection score are broken by it)."""
        raise NotImplementedError

    def strata(self, data: TaskData, idx: np.ndarray) -> np.ndarray:
        """Labels that inner validation splits are stratified by (constant: unstratified)."""
        return np.zeros(len(idx), dtype=int)

    def torch_model(self, aggregator: str, in_dim: int, shape: dict[str, int], cfg: HeadsConfig) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, bag: torch.Tensor, target) -> torch.Tensor:
        """The model's training loss on one bag (a tensor on the model's device) and its target."""
        raise NotImplementedError

    def batch_loss(self, model: nn.Module, pairs: list[tuple[torch.Tensor, object]]) -> torch.Tensor:
        """The loss of one optimiser step (or of the validation bags): the mean of the bags' losses (bags differ
        in length, so each counts once)."""
        return sum(self.loss(model, bag, target) for bag, target in pairs) / len(pairs)

    def schedule(self, cfg: HeadsConfig) -> Schedule:
        """Epochs, early stopping and bags per step of this task's torch heads."""
        return Schedule(cfg.epochs, cfg.min_epochs, cfg.patience, cfg.bags_per_step)

    def finalise(self, model: nn.Module, train_bags: list[np.ndarray]) -> nn.Module:
        """The fitted model as it is kept and exported (survival: with its training median risk)."""
        return model

    def fit_mean(self, train: list[tuple[np.ndarray, object]], seed: int, guide: nn.Module | None = None) -> nn.Module:
        """The linear head over pooled bags: mean-pooled, or pooled by ``guide``'s attention (``guided``)."""
        raise NotImplementedError

    def fit_linear(self, train: list[tuple[np.ndarray, object]], seed: int, cfg: HeadsConfig,
                   guide: nn.Module | None = None) -> nn.Module:
        """The linear head as ``fit_head`` fits it (``fit_mean``; a kind whose linear model has settings of its
        own reads them from ``cfg``)."""
        return self.fit_mean(train, seed, guide)

    def score(self, data: TaskData, idx: np.ndarray, outputs: list) -> dict[str, float]:
        raise NotImplementedError

    def summarise(self, result, data: TaskData, idx: np.ndarray, outputs: list, cfg: HeadsConfig) -> None:
        """Pooled extras on the CV result: intervals and out-of-fold predictions, or per-gene rows."""
        raise NotImplementedError

    @staticmethod
    def selection_score(pooled: dict) -> float:
        """The number models of this task are compared by."""
        raise NotImplementedError


def label_params(catalog: Catalog) -> LabelsConfig:
    """The labels config the current label set was made with (thresholds, pseudo-count, panel, controls)."""
    rows = catalog.query("SELECT params FROM label_sets WHERE is_current")
    params = json.loads(rows[0]["params"]) if rows and rows[0]["params"] else {}
    return LabelsConfig.model_validate({k: v for k, v in params.items() if k in LabelsConfig.model_fields})


def labels_and_folds(catalog: Catalog, bags: dict[str, Bag]) -> tuple[pd.DataFrame, dict[str, int]]:
    labels = pd.DataFrame(catalog.query("SELECT * FROM slide_labels"))
    folds = {r["slide_id"]: r["fold"] for r in catalog.query("SELECT slide_id, fold FROM cv_folds")}
    if labels.empty:
        raise ValueError("no slide labels: run `histcode labels ingest` and `histcode labels gate`")
    return labels[labels.slide_id.isin(bags) & labels.slide_id.isin(folds)], folds




TASKS: dict[str, TaskKind] = {}  # name -> kind; filled by histcode.heads.tasks
