"""Task kinds: what a head learns from a slide and how it is scored, as objects instead of name checks.

- ``ClassTask`` (tumour vs normal, LUAD vs LUSC): class ids as targets, stratified inner splits, CLAM_SB / CLAM_MB /
  max-instance / mean-pool logistic heads (for LUAD vs LUSC also the tumour-guided logistic head), AUC /
  accuracy / balanced accuracy / F1 with bootstrap intervals.
- ``SurvivalTask`` (overall survival, ``histcode.heads.survival``): (time, event) per tumour slide from its
  patient's survival labels, the attention-MIL Cox head or the ridge-penalised linear Cox model on mean vectors,
  Harrell's C-index, time-dependent AUC, Kaplan-Meier and log-rank of the high/low risk groups.
- ``DETask`` (differential expression of the driver panel): per gene (log2FC, up/unchanged/down id) as
  targets, the multi-task (or per-gene) attention head or mean-pool / tumour-guided ridge + logistic heads,
  per-gene AUC, Pearson and Spearman; control genes (``labels.control_genes``: no morphological signal expected) are scored
  apart from the rest and take no part in choosing a model.

Each kind also selects its labelled slides from the catalog (``load``). ``TaskData`` is the loaded task:
slide ids, patients, planned folds and targets. ``for_fold(data, k)`` is the task as outer fold k's training
may see it: for DE, the cohort-normal reference and the choice of classified genes are computed from the
training folds' samples only. ``tested(data)`` holds each slide's targets as its own test fold defines them,
which is what pooled out-of-fold predictions are scored against.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from torch import nn

from histcode.config import HeadsConfig
from histcode.heads import metrics
from histcode.heads.data import Bag
from histcode.heads.survival import SurvivalTask
from histcode.heads.task_kind import TASKS, Schedule, TaskData, TaskKind, label_params, labels_and_folds
from histcode.heads.fit import GUIDED, PerGeneDE, fit_mean_classes, fit_mean_de
from histcode.heads.strata import fraction_strata, tumour_fractions
from histcode.heads.models import CLAMMultiBranch, CLAMSingleBranch, MaxInstance, MultiTaskDE
from histcode.labels.barcodes import NORMAL
from histcode.labels.de import DOWN, UNCHANGED, UP, fold_changes, gene_inclusion, panel_matrix
from histcode.store.catalog import Catalog

DE_CLASSES = (DOWN, UNCHANGED, UP)  # index = class id


class ClassTask(TaskKind):
    aggregators = ("attention", "attention_mb", "mean", "max")
    needs_every_class = True
    subtyping = False  # CLAM's subtyping: every slide is of one of the classes (no "absent" class)

    def __init__(self, name: str) -> None:
        self.name = name

    def labelled(self, labels: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...], np.ndarray]:
        """(the labelled slides, the class names, class ids)."""
        raise NotImplementedError

    def load(self, catalog: Catalog, bags: dict[str, Bag]) -> TaskData:
        labels, folds = labels_and_folds(catalog, bags)
        frame, classes, y = self.labelled(labels)
        return TaskData(self.name, frame.slide_id.tolist(), frame.patient_id.to_numpy(),
                        frame.slide_id.map(folds).to_numpy(), y, classes,
                        tumour_fraction=tumour_fractions(catalog, frame.slide_id.tolist()))

    def targets(self, data: TaskData, idx: np.ndarray) -> list:
        return [int(data.y[i]) for i in idx]

    def val_loss(self, data: TaskData, idx: np.ndarray, outputs: list) -> float:
        if len(idx) == 0:
            return float("nan")
        p = np.array([outputs[i][int(data.y[i])] for i in idx], dtype=float)
        return float(-np.mean(np.log(np.clip(p, 1e-7, 1.0))))

    def strata(self, data: TaskData, idx: np.ndarray) -> np.ndarray:
        return data.y[idx]

    def torch_model(self, aggregator: str, in_dim: int, shape: dict[str, int], cfg: HeadsConfig) -> nn.Module:
        if aggregator == "attention":
            return CLAMSingleBranch(in_dim, shape["classes"], k_sample=cfg.k_sample, bag_weight=cfg.bag_weight,
                                    subtyping=self.subtyping)
        if aggregator == "attention_mb":
            return CLAMMultiBranch(in_dim, shape["classes"], k_sample=cfg.k_sample, bag_weight=cfg.bag_weight,
                                   subtyping=self.subtyping)
        if aggregator == "max":
            return MaxInstance(in_dim, shape["classes"])
        raise ValueError(f"{self.name}: no torch head for aggregator {aggregator!r}")

    def loss(self, model: nn.Module, bag: torch.Tensor, target) -> torch.Tensor:
        return model.loss(bag, int(target))

    def fit_mean(self, train: list[tuple[np.ndarray, object]], seed: int, guide: nn.Module | None = None) -> nn.Module:
        return fit_mean_classes(train, seed, guide)

    def score(self, data: TaskData, idx: np.ndarray, outputs: list) -> dict[str, float]:
        if len(idx) == 0:
            return {}
        return metrics.classification(data.y[idx], np.stack([outputs[i] for i in idx]))

    def summarise(self, result, data: TaskData, idx: np.ndarray, outputs: list, cfg: HeadsConfig) -> None:
        y = data.y[idx]
        proba = np.stack([outputs[i] for i in idx])
        intervals = metrics.bootstrap_classification(y, proba, data.patients[idx], ("auc", "balanced_accuracy"),
                                                     cfg.bootstrap, cfg.seed)
        for m, (lo, hi) in intervals.items():
            result.pooled[f"{m}_ci_low"], result.pooled[f"{m}_ci_high"] = lo, hi
        result.predictions = pd.DataFrame({"slide_id": np.array(data.slide_ids)[idx], "fold": data.folds[idx], "y": y,
                                           **{f"p_{c}": proba[:, j] for j, c in enumerate(data.classes)}})
        if data.tumour_fraction is not None and "tumor" in data.classes:
            result.pooled.update(fraction_strata(y, proba[:, data.classes.index("tumor")], data.tumour_fraction[idx],
                                                 cfg.tumour_fraction_bins))

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
    aggregators = ("attention", "attention_mb", "mean", "max", GUIDED)  # guided: pooled by the tumour head's attention

    def labelled(self, labels: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...], np.ndarray]:
        frame = labels[(labels.tumor == True) & labels.subtype.notna()]  # noqa: E712 -- nullable column
        classes = tuple(sorted(frame.subtype.unique()))
        return frame, classes, frame.subtype.map({c: i for i, c in enumerate(classes)}).to_numpy()


class DETask(TaskKind):
    """Differential expression of every panel gene against the matched (or cohort) normal, on tumour slides."""

    name = "de"
    aggregators = ("attention", "mean", GUIDED)  # max-instance MIL has no fold-change form

    def load(self, catalog: Catalog, bags: dict[str, Bag]) -> TaskData:
        _, folds = labels_and_folds(catalog, bags)
        de = pd.DataFrame(catalog.query("SELECT slide_id, patient_id, sample_id, gene, log2fc, de_class FROM de_labels"))
        genes_gate = pd.DataFrame(catalog.query("SELECT gene, included FROM gene_gate"))
        if de.empty:
            raise ValueError("no DE labels: run `histcode labels ingest`")
        de = de[de.slide_id.isin(bags) & de.slide_id.isin(folds)]
        genes = tuple(genes_gate.gene)
        fc, ids = _pivot(de, list(genes))
        included = genes_gate.set_index("gene").included.reindex(list(genes)).fillna(False).to_numpy(dtype=bool)
        ids[:, ~included] = -1
        slides = fc.index.tolist()
        patients = de.drop_duplicates("slide_id").set_index("slide_id").patient_id.reindex(slides).to_numpy()
        lcfg = label_params(catalog)
        patient_fold = {r["patient_id"]: r["fold"] for r in catalog.query("SELECT patient_id, fold FROM cv_folds")}
        slides_of = {sample: sorted(set(g)) for sample, g in de.groupby("sample_id").slide_id}  # as ingest labelled them
        source = {"lcfg": lcfg, "matrix": panel_matrix(catalog, lcfg), "gate_included": included,
                  "samples": pd.DataFrame(catalog.query("SELECT * FROM expression_samples")), "patient_fold": patient_fold,
                  "slides_of": slides_of}
        fc_values = fc.to_numpy(dtype=np.float32)
        return TaskData(self.name, slides, patients, np.array([folds[s] for s in slides]), fc_values,
                        DE_CLASSES, genes, ids, included, _mean_abs(fc_values), np.isin(genes, lcfg.control_genes or ()),
                        source=source)

    def for_fold(self, data: TaskData, k: int) -> TaskData:
        """Labels of every slide with the cohort-normal reference averaged over the training folds' normal
        samples, and genes classified only where the training folds' patients give every class enough members
        (and the gate kept the gene)."""
        src = data.source
        if src is None:
            return data
        lcfg, samples = src["lcfg"], src["samples"]
        normals = samples[samples.kind == NORMAL]
        allowed = {r.sample_id for r in normals.itertuples() if src["patient_fold"].get(r.patient_id, -1) != k}
        frame = fold_changes(src["matrix"], samples, lcfg, cohort_normals=allowed, slides_of=src.get("slides_of"))
        frame = frame[frame.slide_id.isin(data.slide_ids)]
        fc, y_class = _pivot(frame, list(data.genes), data.slide_ids)
        training = frame[frame.slide_id.isin(np.array(data.slide_ids)[data.folds != k])]
        kept = gene_inclusion(training, lcfg, present=set(src["matrix"].index)).set_index("gene").included
        included = src["gate_included"] & kept.reindex(list(data.genes)).fillna(False).to_numpy(dtype=bool)
        y_class[:, ~included] = -1
        y = fc.to_numpy(dtype=np.float32)
        return replace(data, y=y, y_class=y_class, gene_included=included, mean_abs_log2fc=_mean_abs(y))

    def tested(self, data: TaskData) -> TaskData:
        if data.source is None:
            return data
        y, y_class = data.y.copy(), data.y_class.copy()
        included = np.zeros(len(data.genes), dtype=bool)
        for k in range(data.n_folds):
            rows = data.folds == k
            if rows.any():
                fold = self.for_fold(data, k)
                y[rows], y_class[rows] = fold.y[rows], fold.y_class[rows]
                included |= fold.gene_included
        return replace(data, y=y, y_class=y_class, gene_included=included, mean_abs_log2fc=_mean_abs(y))

    def targets(self, data: TaskData, idx: np.ndarray) -> list:
        return [(data.y[i], data.y_class[i]) for i in idx]

    def val_loss(self, data: TaskData, idx: np.ndarray, outputs: list) -> float:
        if len(idx) == 0:
            return float("nan")
        err = np.stack([outputs[i][:, 0] for i in idx]) - data.y[idx]
        return float(np.nanmean(err ** 2)) if np.isfinite(err).any() else float("nan")

    def torch_model(self, aggregator: str, in_dim: int, shape: dict[str, int], cfg: HeadsConfig) -> nn.Module:
        if aggregator != "attention":
            raise ValueError("the DE task has attention and mean aggregators")
        return PerGeneDE(in_dim, shape["genes"]) if cfg.de_mode == "per_gene" else MultiTaskDE(in_dim, shape["genes"])

    def loss(self, model: nn.Module, bag: torch.Tensor, target) -> torch.Tensor:
        fc, cls = target
        return model.loss(bag, torch.tensor(fc, device=bag.device), torch.tensor(cls, device=bag.device).long())

    def fit_mean(self, train: list[tuple[np.ndarray, object]], seed: int, guide: nn.Module | None = None) -> nn.Module:
        return fit_mean_de(train, seed, guide)

    def gene_rows(self, data: TaskData, idx: np.ndarray, outputs: list) -> list[dict]:
        out = np.stack([outputs[i] for i in idx])  # (n, genes, 4)
        rows = metrics.per_gene(data.genes, data.y[idx], out[:, :, 0], data.y_class[idx], out[:, :, 1:],
                                data.mean_abs_log2fc)
        controls = data.controls if data.controls is not None else np.zeros(len(data.genes), dtype=bool)
        for row, control in zip(rows, controls):
            row["control"] = bool(control)
        return rows

    def score(self, data: TaskData, idx: np.ndarray, outputs: list) -> dict[str, float]:
        if len(idx) == 0:
            return {}
        rows = self.gene_rows(data, idx, outputs)
        out = {}
        for prefix, group in (("", [r for r in rows if not r["control"]]), ("control_", [r for r in rows if r["control"]])):
            if prefix and not group:
                continue
            for metric in ("auc", "pearson"):
                values = [r[metric] for r in group if not np.isnan(r[metric])]
                out[f"{prefix}mean_gene_{metric}"] = float(np.mean(values)) if values else float("nan")
        return out

    def summarise(self, result, data: TaskData, idx: np.ndarray, outputs: list, cfg: HeadsConfig) -> None:
        result.genes = self.gene_rows(data, idx, outputs)
        out = np.stack([outputs[i] for i in idx])
        signal = np.array([not r["control"] for r in result.genes])
        boot = metrics.bootstrap_genes(data.y[idx], out[:, :, 0], data.y_class[idx], out[:, :, 1:], data.patients[idx],
                                       cfg.bootstrap, cfg.seed, summary=signal)
        for row, ci in zip(result.genes, boot["genes"]):
            row.update(ci)
        for metric in ("auc", "pearson"):
            lo, hi = boot[f"mean_gene_{metric}_ci"]
            result.pooled[f"mean_gene_{metric}_ci_low"], result.pooled[f"mean_gene_{metric}_ci_high"] = lo, hi

    @staticmethod
    def selection_score(pooled: dict) -> float:
        return float(pooled.get("mean_gene_auc", float("nan")))


def _pivot(de: pd.DataFrame, genes: list[str], slides: list[str] | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Long DE labels -> (slides x genes log2FC frame, class ids with -1 where unlabelled), rows in the order of
    ``slides`` when given (slides without labels: NaN / -1)."""
    fc = de.pivot_table(index="slide_id", columns="gene", values="log2fc", dropna=False).reindex(columns=genes)
    if slides is not None:
        fc = fc.reindex(slides)
    cls = de.pivot_table(index="slide_id", columns="gene", values="de_class", aggfunc="first").reindex(index=fc.index,
                                                                                                       columns=genes)
    codes = {c: i for i, c in enumerate(DE_CLASSES)}
    ids = cls.apply(lambda col: col.map(codes)).fillna(-1).astype(int).to_numpy().copy()
    return fc, ids


def _mean_abs(fc: np.ndarray) -> np.ndarray:
    """Each gene's mean |log2FC| over the slides where it is known (NaN for a gene known nowhere)."""
    known = np.isfinite(fc)
    counts = known.sum(axis=0)
    sums = np.where(known, np.abs(fc), 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


TASKS.update({"tumor": TumourTask("tumor"), "subtype": SubtypeTask("subtype"), "de": DETask(),
              "survival": SurvivalTask()})

__all__ = ["DE_CLASSES", "TASKS", "ClassTask", "DETask", "Schedule", "SubtypeTask", "SurvivalTask", "TaskData",
           "TaskKind", "TumourTask", "label_params", "task_data"]


def task_data(catalog: Catalog, task: str, bags: dict[str, Bag]) -> TaskData:
    """The labelled slides of ``task`` that have a bag, with their folds and targets."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return TASKS[task].load(catalog, bags)
