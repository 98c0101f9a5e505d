"""A task's bags of tile vectors as a ``torch.utils.data.Dataset``, with the patient folds the heads use, for a
multiple-instance model of one's own."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from histcode.features.registry import FeatureView
from histcode.heads.data import Bag, load_bags
from histcode.heads.tasks import TASKS, TaskData, task_data
from histcode.labels.run import require_passed_gate
from histcode.errors import UsageError
from histcode.store.catalog import Catalog, CatalogError
from histcode.workspace import Workspace as Paths


class BagDataset(Dataset):
    """Item ``i`` is ``(bag, target, slide_id)``: ``bag`` a float tensor ``(n_tiles, dim)`` of the slide's tile
    vectors in (y, x) order, ``target`` the class id (``tumor``: 0 normal, 1 tumour; ``subtype``: the index in
    ``classes``) as a long tensor, or for ``de`` the float tensor of each panel gene's log2 fold change (NaN where
    unknown; ``de_classes`` holds the down/unchanged/up ids, -1 where a gene is not classified). Bags differ in
    length: use ``DataLoader(dataset, batch_size=1)`` or a collate function of your own.

    ``folds[i]`` is the slide's fold in the label gate's patient-grouped plan (all slides of a patient share
    one), the folds `histcode heads` cross-validates over; ``split(k)`` gives (training, test) datasets for
    outer fold ``k`` with every target as fold ``k``'s training may see it. Train through ``split``: for DE the
    whole dataset's targets are each slide's as its own test fold defines them (the cohort-normal reference of
    every other fold), so a model fitted across folds on them would see its test folds' normal samples. The
    bags are memory-mapped from the view's table, read a few slides at a time: building the dataset does not
    load the view into memory."""

    def __init__(self, task: str, bags: dict[str, Bag], data: TaskData, index: np.ndarray | None = None,
                 held_out: int | None = None) -> None:
        self.task = task
        self._bags = bags
        self._data = data
        self._index = np.arange(len(data.slide_ids)) if index is None else np.asarray(index, dtype=np.int64)
        self._held_out = held_out  # the outer fold this dataset was split around (None: the whole task)

    @classmethod
    def of(cls, paths: Paths, view: FeatureView, task: str, as_of: int | str | None = None) -> BagDataset:
        """The dataset of ``task`` in ``view`` (``View.bags`` is the way to make one)."""
        if task not in TASKS:
            raise UsageError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        catalog = Catalog.of(paths)
        require_passed_gate(catalog)
        labelled = sorted({r["slide_id"] for r in catalog.query(
            "SELECT slide_id FROM cv_folds WHERE slide_id IN (SELECT slide_id FROM slide_labels "
            "UNION SELECT slide_id FROM de_labels)")})
        bags = load_bags(paths, view, as_of, slide_ids=labelled)  # the task's slides only, not the whole view
        if not bags:
            raise CatalogError(f"no labelled slide has vectors in view {view.view_id}"
                               + (f" at {as_of!r}" if as_of is not None else "") + ": run `histcode embed`")
        data = task_data(catalog, task, bags)
        if not data.slide_ids:
            raise CatalogError(f"no slide labelled for {task} has vectors in view {view.view_id}: run `histcode embed`")
        return cls(task, bags, TASKS[task].tested(data))

    # -- the items --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"bag {i} of a dataset of {len(self)}")
        row = int(self._index[i])
        slide_id = self._data.slide_ids[row]
        bag = torch.from_numpy(np.array(self._bags[slide_id].features, dtype=np.float32, copy=True))
        return bag, self._target(row), slide_id

    def _target(self, row: int) -> torch.Tensor:
        y = self._data.y[row]
        if self.task == "de":
            return torch.from_numpy(np.asarray(y, dtype=np.float32).copy())
        return torch.tensor(int(y), dtype=torch.long)

    # -- what the rows are ------------------------------------------------------------------------------
    @property
    def slide_ids(self) -> list[str]:
        """The bags' slides, in item order."""
        return [self._data.slide_ids[r] for r in self._index]

    @property
    def patients(self) -> np.ndarray:
        """Each bag's patient."""
        return self._data.patients[self._index]

    @property
    def folds(self) -> np.ndarray:
        """Each bag's outer fold (the label gate's plan)."""
        return self._data.folds[self._index]

    @property
    def n_folds(self) -> int:
        """How many outer folds the plan has (of the whole task, also in a split)."""
        return self._data.n_folds

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names by id (``de``: down, unchanged, up)."""
        return self._data.classes

    @property
    def genes(self) -> tuple[str, ...]:
        """``de``: the panel genes, in the order of the target's values; empty for the other tasks."""
        return self._data.genes

    @property
    def de_classes(self) -> np.ndarray | None:
        """``de``: (slides, genes) class ids (0 down, 1 unchanged, 2 up, -1 not classified)."""
        return None if self._data.y_class is None else self._data.y_class[self._index]

    @property
    def dim(self) -> int:
        """The tile vectors' dimension."""
        first = next(iter(self._bags.values()), None)
        return 0 if first is None else int(first.features.shape[1])

    def frame(self) -> pd.DataFrame:
        """One row per bag: ``slide_id``, ``patient_id``, ``fold``, ``n_tiles`` and (classification) ``target``
        and ``label``."""
        out = pd.DataFrame({"slide_id": self.slide_ids, "patient_id": self.patients, "fold": self.folds,
                            "n_tiles": [len(self._bags[s].features) for s in self.slide_ids]})
        if self.task != "de":
            target = self._data.y[self._index].astype(int)
            out["target"] = target
            out["label"] = [self.classes[t] for t in target]
        return out

    def split(self, k: int) -> tuple[BagDataset, BagDataset]:
        """(training, test) for outer fold ``k``: the test fold's patients are never in training, and every
        target is computed as fold ``k``'s training may see it."""
        if self._held_out is not None:
            raise UsageError(f"this dataset is already a split around fold {self._held_out}: split the dataset "
                             "view.bags() made (each split computes its targets from its own training folds)")
        if not 0 <= k < self.n_folds:
            raise UsageError(f"fold {k} is not one of 0..{self.n_folds - 1}")
        fold_data = TASKS[self.task].for_fold(self._data, k)
        test = self._index[self._data.folds[self._index] == k]
        train = self._index[self._data.folds[self._index] != k]
        return (BagDataset(self.task, self._bags, fold_data, train, held_out=k),
                BagDataset(self.task, self._bags, fold_data, test, held_out=k))

    def __repr__(self) -> str:
        return f"BagDataset({self.task}: {len(self)} slides, {self.n_folds} folds, {self.dim}-d tiles)"
