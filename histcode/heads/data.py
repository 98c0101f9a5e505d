"""Bags of tile embeddings per slide, and the labelled slide sets of each task with their folds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from histcode.features.read import tile_features
from histcode.features.registry import FeatureView
from histcode.labels.de import DOWN, UNCHANGED, UP
from histcode.store.catalog import Catalog
from histcode.workspace import Workspace

DE_CLASSES = (DOWN, UNCHANGED, UP)  # index = class id


@dataclass
class Bag:
    slide_id: str
    patient_id: str
    features: np.ndarray  # (n_tiles, dim) float32
    tile_ids: list[str]
    xy: np.ndarray  # (n_tiles, 2) level-0 corners
    size: int


def load_bags(ws: Workspace, view: FeatureView, as_of: int | str | None = None) -> dict[str, Bag]:
    frame = tile_features(ws, view, as_of=as_of, fmt="pandas")
    bags = {}
    for sid, g in frame.groupby("slide_id", sort=True):
        g = g.sort_values(["y", "x"])
        bags[sid] = Bag(sid, g.patient_id.iloc[0], np.stack(g.vector.to_numpy()).astype(np.float32), g.tile_id.tolist(),
                        g[["x", "y"]].to_numpy(), int(g["size"].iloc[0]))
    return bags


@dataclass
class TaskData:
    name: str  # tumor | subtype | de
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
    def n_folds(self) -> int:
        return int(self.folds.max()) + 1


def task_data(catalog: Catalog, task: str, bags: dict[str, Bag]) -> TaskData:
    labels = pd.DataFrame(catalog.query("SELECT * FROM slide_labels"))
    folds = {r["slide_id"]: r["fold"] for r in catalog.query("SELECT slide_id, fold FROM cv_folds")}
    if labels.empty:
        raise ValueError("no slide labels: run `histcode labels ingest` and `histcode labels gate`")
    labels = labels[labels.slide_id.isin(bags) & labels.slide_id.isin(folds)]
    if task == "tumor":
        frame = labels.dropna(subset=["tumor"])
        classes = ("normal", "tumor")
        y = frame.tumor.astype(bool).astype(int).to_numpy()
        return TaskData(task, frame.slide_id.tolist(), frame.patient_id.to_numpy(),
                        frame.slide_id.map(folds).to_numpy(), y, classes)
    if task == "subtype":
        frame = labels[(labels.tumor == True) & labels.subtype.notna()]  # noqa: E712 -- nullable column
        classes = tuple(sorted(frame.subtype.unique()))
        y = frame.subtype.map({c: i for i, c in enumerate(classes)}).to_numpy()
        return TaskData(task, frame.slide_id.tolist(), frame.patient_id.to_numpy(),
                        frame.slide_id.map(folds).to_numpy(), y, classes)
    if task == "de":
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
        return TaskData(task, slides, patients, np.array([folds[s] for s in slides]), fc.to_numpy(dtype=np.float32),
                        DE_CLASSES, genes, ids, included, np.nanmean(np.abs(fc.to_numpy(dtype=float)), axis=0))
    raise ValueError(f"unknown task {task!r}; tasks: tumor, subtype, de")


def inner_split(patients: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, validation) over a training fold: whole patients go to validation, stratified by
    label where every class has enough patients; the test fold is never touched here."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, int(round(1 / fraction)))
    strata = y if y.ndim == 1 else np.zeros(len(y), dtype=int)
    try:
        splitter = StratifiedGroupKFold(n_splits=min(n_splits, len(np.unique(patients))), shuffle=True, random_state=seed)
        _, val = next(splitter.split(np.zeros(len(patients)), strata, patients))
    except ValueError:
        rng = np.random.default_rng(seed)
        chosen = rng.choice(np.unique(patients), max(1, int(len(np.unique(patients)) * fraction)), replace=False)
        val = np.flatnonzero(np.isin(patients, chosen))
    mask = np.zeros(len(patients), dtype=bool)
    mask[val] = True
    return ~mask, mask
