"""Task kinds: what a head learns from a slide and how it is scored, as objects instead of name checks.

- ``ClassTask`` (tumour vs normal, LUAD vs LUSC): class ids as targets, stratified inner splits, CLAM_SB /
  max-instance / mean-pool logistic heads, AUC / accuracy / balanced accuracy / F1 with bootstrap intervals.
- ``DETask`` (differential expression of the driver panel): per gene (log2FC, up/unchanged/down id) as
  targets, the multi-task (or per-gene) attention head or mean-pool ridge + logistic heads, per-gene AUC,
  Pearson and Spearman.

Each kind also selects its labelled slides from the catalog (``load``). ``TaskData`` is the loaded task:
slide ids, patients, planned folds and targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from histcode.config import HeadsConfig
from histcode.heads import metrics
from histcode.heads.data import Bag
from histcode.heads.fit import PerGeneDE, fit_mean_classes, fit_mean_de
from histcode.heads.models import CLAMSingleBranch, MaxInstance, MultiTaskDE
from histcode.labels.de import DOWN, UNCHANGED, UP
from histcode.store.catalog import Catalog

DE_CLASSES = (DOWN, UNCHANGED, UP)  # index = class id


@dataclass
class TaskData:
    name: str  # tumor | subtype | de: the key of its kind in TASKS
    slide_ids: list[str]
    patients: np.ndarray
    folds: np.ndarray  # the label gate's planned fold of each slide
    y: np.ndarray  # class ids (tumor, subtype); for de: log2FC (n, genes)
    classes: tuple[str, ...] = ()
    genes: tuple[str, ...] = ()
    y_class: np.ndarray | None = None  # de: class ids (n, genes), -1 where the gene is not classified
    gene_included: np.ndarray | None = None
    mean_abs_log2fc: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

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

    def strata(self, data: TaskData, idx: np.ndarray) -> np.ndarray:
        """Labels that inner validation splits are stratified by (constant: unstratified)."""
        return np.zeros(len(idx), dtype=int)

    def torch_model(self, aggregator: str, in_dim: int, shape: dict[str, int], cfg: HeadsConfig) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, bag: np.ndarray, target) -> torch.Tensor:
        raise NotImplementedError

    def fit_mean(self, train: list[tuple[np.ndarray, object]], seed: int) -> nn.Module:
        raise NotImplementedError

    def score(self, data: TaskData, idx: np.ndarray, outputs: list) -> dict[str, float]:
        raise NotImplementedError

    def summarise(self, result, data: TaskData, idx: np.ndarray, outputs: list, cfg: HeadsConfig) -> None:
        """Pooled extras on the CV result: intervals and out-of-fold predictions, or per-gene rows."""
        raise NotImplementedError

    @staticmethod
    def selection_score(pooled: dict) -> float:
        """The number models of this task are compared by."""
        raise NotImplementedError


def _labels_and_folds(catalog: Catalog, bags: dict[str, Bag]) -> tuple[pd.DataFrame, dict[str, int]]:
    labels = pd.DataFrame(catalog.query("SELECT * FROM slide_labels"))
    folds = {r["slide_id"]: r["fold"] for r in catalog.query("SELECT slide_id, fold FROM cv_folds")}
    if labels.empty:
        raise ValueError("no slide labels: run `histcode labels ingest` and `histcode labels gate`")
    return labels[labels.slide_id.isin(bags) & labels.slide_id.isin(folds)], folds


class ClassTask(TaskKind):
    needs_every_class = True
    subtyping = False  # CLAM's subtyping: every slide is of one of the classes (no "absent" class)

    def __init__(self, name: str) -> None:
        self.name = name

    def labelled(self, labels: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...], np.ndarray]:
        """(the labelled slides, the class names, class ids)."""
        raise NotImplementedError

    def load(self, catalog: Catalog, bags: dict[str, Bag]) -> TaskData:
        labels, folds = _labels_and_folds(catalog, bags)
        frame, classes, y = self.labelled(labels)
        return TaskData(self.name, frame.slide_id.tolist(), frame.patient_id.to_numpy(),
                        frame.slide_id.map(folds).to_numpy(), y, classes)

    def targets(self, data: TaskData, idx: np.ndarray) -> list:
        return [int(data.y[i]) for i in idx]

    def strata(self, data: TaskData, idx: np.ndarray) -> np.ndarray:
        return data.y[idx]

    def torch_model(self, aggregator: str, in_dim: int, shape: dict[str, int], cfg: HeadsConfig) -> nn.Module:
        if aggregator == "attention":
            return CLAMSingleBranch(in_dim, shape["classes"], k_sample=cfg.k_sample, bag_weight=cfg.bag_weight,
                                    subtyping=self.subtyping)
        if aggregator == "max":
            return MaxInstance(in_dim, shape["classes"])
        raise ValueError(f"{self.name}: no torch head for aggregator {aggregator!r}")

    def loss(self, model: nn.Module, bag: np.ndarray, target) -> torch.Tensor:
        return model.loss(torch.from_numpy(bag), int(target))

    def fit_mean(self, train: list[tuple[np.ndarray, object]], seed: int) -> nn.Module:
        return fit_mean_classes(train, seed)

    def score(self, data: TaskData, idx: np.ndarray, outputs: list) -> dict[str, float]:
        if len(idx) == 0:
            return {}
        return metrics.classification(data.y[idx], np.stack([outputs[i] for i in idx]))

    def summarise(self, result, data: TaskData, idx: np.ndarray, outputs: list, cfg: HeadsConfig) -> None:
        y = data.y[idx]
        proba = np.stack([outputs[i] for i in idx])
        for m in ("auc", "balanced_accuracy"):
            lo, hi = metrics.bootstrap_ci(y, proba, m, cfg.bootstrap, cfg.seed)
            result.pooled[f"{m}_ci_low"], result.pooled[f"{m}_ci_high"] = lo, hi
        result.predictions = pd.DataFrame({"slide_id": np.array(data.slide_ids)[idx], "fold": data.folds[idx], "y": y,
                                           **{f"p_{c}": proba[:, j] for j, c in enumerate(data.classes)}})

    @staticmethod
    def selection_score(pooled: dict) -> float:
        return float(pooled.get("auc", float("nan")))


class TumourTask(ClassTask):
    """Tumour vs normal, on every labelled slide."""

    def labelled(self, labels: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...], np.ndarray]:
        frame = labels.dropna(subset=["tumor"])
        return frame, ("normal", "tumor"), frame.tumor.astype(bool).astype(int).to_numpy()


class SubtypeTask(ClassTask):
    """The subtype (LUAD vs LUSC), on tumour slides whose subtype is known."""

    subtyping = True

    def labelled(self, labels: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...], np.ndarray]:
        frame = labels[(labels.tumor == True) & labels.subtype.notna()]  # noqa: E712 -- nullable column
        classes = tuple(sorted(frame.subtype.unique()))
        return frame, classes, frame.subtype.map({c: i for i, c in enumerate(classes)}).to_numpy()


class DETask(TaskKind):
    """Differential expression of every panel gene against the matched (or cohort) normal, on tumour slides."""

    name = "de"
    aggregators = ("attention", "mean")  # max-instance MIL has no fold-change form

    def load(self, catalog: Catalog, bags: dict[str, Bag]) -> TaskData:
        _, folds = _labels_and_folds(catalog, bags)
        de = pd.DataFrame(catalog.query("SELECT slide_id, patient_id, gene, log2fc, de_class FROM de_labels"))
        genes_gate = pd.DataFrame(catalog.query("SELECT gene, included FROM gene_gate"))
        if de.empty:
            raise ValueError("no DE labels: run `histcode labels ingest`")
        de = de[de.slide_id.isin(bags) & de.slide_id.isin(folds)]
        genes = tuple(genes_gate.gene)
        fc = de.pivot_table(index="slide_id", columns="gene", values="log2fc").reindex(columns=list(genes))
        cls = de.pivot_table(index="slide_id", columns="gene", values="de_class", aggfunc="first").reindex(columns=list(genes))
        included = genes_gate.set_index("gene").included.reindex(list(genes)).fillna(False).to_numpy(dtype=bool)
        ids = cls.apply(lambda col: col.map({c: i for i, c in enumerate(DE_CLASSES)})).fillna(-1).astype(int).to_numpy().copy()
        ids[:, ~included] = -1
        slides = fc.index.tolist()
        patients = de.drop_duplicates("slide_id").set_index("slide_id").patient_id.reindex(slides).to_numpy()
        return TaskData(self.name, slides, patients, np.array([folds[s] for s in slides]), fc.to_numpy(dtype=np.float32),
                        DE_CLASSES, genes, ids, included, np.nanmean(np.abs(fc.to_numpy(dtype=float)), axis=0))

    def targets(self, data: TaskData, idx: np.ndarray) -> list:
        return [(data.y[i], data.y_class[i]) for i in idx]

    def torch_model(self, aggregator: str, in_dim: int, shape: dict[str, int], cfg: HeadsConfig) -> nn.Module:
        if aggregator != "attention":
            raise ValueError("the DE task has attention and mean aggregators")
        return PerGeneDE(in_dim, shape["genes"]) if cfg.de_mode == "per_gene" else MultiTaskDE(in_dim, shape["genes"])

    def loss(self, model: nn.Module, bag: np.ndarray, target) -> torch.Tensor:
        fc, cls = target
        return model.loss(torch.from_numpy(bag), torch.from_numpy(fc), torch.from_numpy(cls).long())

    def fit_mean(self, train: list[tuple[np.ndarray, object]], seed: int) -> nn.Module:
        return fit_mean_de(train, seed)

    def gene_rows(self, data: TaskData, idx: np.ndarray, outputs: list) -> list[dict]:
        out = np.stack([outputs[i] for i in idx])  # (n, genes, 4)
        return metrics.per_gene(data.genes, data.y[idx], out[:, :, 0], data.y_class[idx], out[:, :, 1:],
                                data.mean_abs_log2fc)

    def score(self, data: TaskData, idx: np.ndarray, outputs: list) -> dict[str, float]:
        if len(idx) == 0:
            return {}
        rows = self.gene_rows(data, idx, outputs)
        aucs = [r["auc"] for r in rows if not np.isnan(r["auc"])]
        pearsons = [r["pearson"] for r in rows if not np.isnan(r["pearson"])]
        return {"mean_gene_auc": float(np.mean(aucs)) if aucs else float("nan"),
                "mean_gene_pearson": float(np.mean(pearsons)) if pearsons else float("nan")}

    def summarise(self, result, data: TaskData, idx: np.ndarray, outputs: list, cfg: HeadsConfig) -> None:
        result.genes = self.gene_rows(data, idx, outputs)

    @staticmethod
    def selection_score(pooled: dict) -> float:
        return float(pooled.get("mean_gene_auc", float("nan")))


TASKS: dict[str, TaskKind] = {"tumor": TumourTask("tumor"), "subtype": SubtypeTask("subtype"), "de": DETask()}


def task_data(catalog: Catalog, task: str, bags: dict[str, Bag]) -> TaskData:
    """The labelled slides of ``task`` that have a bag, with their folds and targets."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return TASKS[task].load(catalog, bags)
