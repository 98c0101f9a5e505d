"""Inside a training fold, early stopping and the choice among aggregators use two different patient splits:
no head fits or stops on the patients it is then chosen by, whether it stops early (torch heads) or not
(the linear heads, which fit on the stopping split too)."""

from __future__ import annotations

import numpy as np
import pytest

import histcode.heads.cv as cv
from histcode.config import HeadsConfig
from histcode.heads.data import Bag, inner_splits
from histcode.heads.tasks import TaskData


def _task(n_patients: int = 15) -> tuple[TaskData, dict[str, Bag]]:
    rng = np.random.default_rng(0)
    slides, patients, y, bags = [], [], [], {}
    for p in range(n_patients):
        for s in range(2):
            sid, label = f"P{p}-S{s}", (p + s) % 2
            feats = rng.normal(size=(10, 6)).astype(np.float32) + label * 1.5
            bags[sid] = Bag(sid, f"P{p}", feats, [f"{sid}-t{i}" for i in range(10)], np.zeros((10, 2)), 256)
            slides.append(sid), patients.append(f"P{p}"), y.append(label)
    folds = np.array([int(p[1:]) % 3 for p in patients])
    return TaskData("tumor", slides, np.array(patients), folds, np.array(y), ("normal", "tumor")), bags


def test_inner_splits_are_disjoint_whole_patients_of_the_asked_shares() -> None:
    patients = np.repeat([f"P{i}" for i in range(20)], 2)
    y = np.tile([0, 1], 20)
    fit, stop, select = inner_splits(patients, y, 0.2, 0.2, seed=3)
    assert (fit.astype(int) + stop + select == 1).all()  # every slide in exactly one split
    groups = [set(patients[m]) for m in (fit, stop, select)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])  # whole patients
    assert len(groups[2]) == 4 and len(groups[1]) == 4  # a fifth of the fold's 20 patients each
    again = inner_splits(patients, y, 0.2, 0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((fit, stop, select), again))


@pytest.mark.parametrize("aggregator", ["attention", "mean"])
def test_no_head_fits_or_stops_on_the_patients_it_is_chosen_by(aggregator: str, monkeypatch) -> None:
    task, bags = _task()
    fed: list[set[int]] = []
    real = cv.fit_head

    def recording(kind, agg, train, val, *args, **kw):
        fed.append({id(b) for b, _ in train} | {id(b) for b, _ in val})
        if agg == "mean":
            assert not val  # a linear head has nothing to stop: it fits on the stopping split too
        return real(kind, agg, train, val, *args, **kw)

    monkeypatch.setattr(cv, "fit_head", recording)
    cfg = HeadsConfig(epochs=12, min_epochs=2, patience=3, lr=3e-3, bootstrap=10, k_sample=2)
    result = cv.cross_validate(task, bags, aggregator, cfg)
    patient = dict(zip(task.slide_ids, task.patients))
    assert len(fed) == len(result.fold_slides) == 3
    for fold, seen in zip(result.fold_slides, fed):
        parts = {k: {patient[s] for s in fold[k]} for k in ("train", "stop", "select", "test")}
        assert parts["select"] and parts["test"]
        assert not parts["select"] & (parts["train"] | parts["stop"] | parts["test"])
        assert bool(parts["stop"]) == (aggregator == "attention")
        assert not {id(bags[s].features) for s in fold["select"]} & seen  # never read while fitting
        assert {id(bags[s].features) for s in fold["train"] + fold["stop"]} == seen
    for fold in result.fold_metrics:  # the selection score comes from the selection split
        assert np.isfinite(fold["val_score"])
