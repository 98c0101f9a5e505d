"""The tumour-guided aggregator: subtype and DE read from slide vectors pooled by a tumour head's attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histcode.config import HeadsConfig
from histcode.heads.cv import cross_validate, fit_on
from histcode.heads.data import Bag
from histcode.heads.fit import GUIDED, GuidedLinear, fit_mean_classes
from histcode.heads.guided import FittedGuide, TumourGuides
from histcode.heads.models import CLAMSingleBranch
from histcode.heads.tasks import TaskData

CFG = HeadsConfig(epochs=30, min_epochs=5, patience=5, lr=2e-3, bootstrap=20, k_sample=2, seed=0)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_guided_head_equals_attention_pooling_written_from_the_equations() -> None:
    """Ilse et al. 2018 (gated attention, eq. 9) and CLAM_SB's fc layer, in numpy from the guide's weights:
    h_i = ReLU(W1 x_i + b1), a_i = softmax_i(w^T (tanh(V h_i) * sigm(U h_i))), the slide vector sum_i a_i x_i
    over the RAW tiles, standardised, then the logistic model's softmax."""
    torch.manual_seed(0)
    guide = CLAMSingleBranch(6, 2, k_sample=2).eval()
    rng = np.random.default_rng(1)
    mean, scale = rng.normal(size=6), rng.uniform(0.5, 2, size=6)
    weight, bias = rng.normal(size=(2, 6)), rng.normal(size=2)
    head = GuidedLinear(guide, mean, scale, weight, bias).eval()
    x = rng.normal(size=(9, 6)).astype(np.float32)
    with torch.no_grad():
        out, attention = head(torch.from_numpy(x))
    p = {k: v.detach().numpy().astype(np.float64) for k, v in guide.state_dict().items()}
    h = np.maximum(x @ p["fc.0.weight"].T + p["fc.0.bias"], 0)
    gate = np.tanh(h @ p["attention.tanh.0.weight"].T + p["attention.tanh.0.bias"]) * \
        (1 / (1 + np.exp(-(h @ p["attention.sigmoid.0.weight"].T + p["attention.sigmoid.0.bias"]))))
    a = _softmax((gate @ p["attention.score.weight"].T + p["attention.score.bias"])[:, 0])
    z = (a @ x - mean) / scale
    np.testing.assert_allclose(attention.numpy(), a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.numpy(), _softmax(weight @ z + bias), rtol=1e-4, atol=1e-6)
    assert not any(q.requires_grad for q in head.guide.parameters())  # the guide is frozen


def _cohort(n_patients: int = 18, tiles: int = 30, seed: int = 0) -> tuple[TaskData, TaskData, dict[str, Bag]]:
    """Every patient a normal slide and a tumour slide whose tumour is a small focus (2 of 30 tiles). Tumour
    tiles carry a tumour direction (feature 0) and their subtype (+-feature 1); benign tiles carry neither, but
    every slide's benign tissue has its own large offset along feature 1, so a slide's mean reads that offset,
    not the subtype."""
    rng = np.random.default_rng(seed)
    bags, tumour_rows, subtype_rows = {}, [], []
    for p in range(n_patients):
        subtype = p % 2
        for kind in ("N", "T"):
            sid = f"P{p:02d}-{kind}"
            x = rng.normal(scale=0.5, size=(tiles, 4)).astype(np.float32)
            x[:, 1] += rng.normal(scale=3.0)  # the slide's benign offset along the subtype direction
            if kind == "T":
                focus = rng.choice(tiles, 2, replace=False)
                x[focus, 0] += 4.0
                x[focus, 1] = (1 if subtype else -1) * 3.0 + rng.normal(scale=0.3, size=2)
                subtype_rows.append((sid, f"P{p:02d}", subtype))
            bags[sid] = Bag(sid, f"P{p:02d}", x, [f"{sid}-{i}" for i in range(tiles)], np.zeros((tiles, 2)), 256)
            tumour_rows.append((sid, f"P{p:02d}", int(kind == "T")))

    def task(name, rows, classes):
        patients = np.array([r[1] for r in rows])
        folds = np.array([int(pid[1:]) % 3 for pid in patients])  # planned by patient, as the label gate does
        return TaskData(name, [r[0] for r in rows], patients, folds, np.array([r[2] for r in rows]), classes)

    return task("tumor", tumour_rows, ("normal", "tumor")), task("subtype", subtype_rows, ("LUAD", "LUSC")), bags


def test_guides_never_see_the_test_fold_and_fit_on_refuses_one_that_did() -> None:
    tumour, subtype, bags = _cohort()
    guides = TumourGuides(tumour, bags, CFG)
    for k in range(3):
        assert not guides(k).patients & set(tumour.patients[tumour.folds == k])
        assert guides(k) is guides(k)  # fitted once, shared by the tasks
    assert guides(None).patients == set(tumour.patients)
    rest = np.flatnonzero(subtype.folds != 0)
    with pytest.raises(RuntimeError, match="must not see"):
        fit_on(subtype, bags, rest, GUIDED, CFG, 0, guides(None))  # fitted on fold 0's patients too
    with pytest.raises(ValueError, match="needs a guide"):
        fit_on(subtype, bags, rest, GUIDED, CFG, 0)
    with pytest.raises(ValueError, match="tumour head"):
        TumourGuides(subtype, bags, CFG)
    only_tumours = np.flatnonzero(tumour.y == 1)
    with pytest.raises(ValueError, match="tumour and normal slides"):  # a cohort without normal slides has nothing to guide by
        TumourGuides(_subset(tumour, only_tumours), bags, CFG)


def _subset(task: TaskData, idx: np.ndarray) -> TaskData:
    return TaskData(task.name, [task.slide_ids[i] for i in idx], task.patients[idx], task.folds[idx], task.y[idx],
                    task.classes)


def test_guided_reads_the_subtype_of_small_foci_that_mean_pooling_misses() -> None:
    tumour, subtype, bags = _cohort()
    guides = TumourGuides(tumour, bags, CFG)
    guided = cross_validate(subtype, bags, GUIDED, CFG, guides=guides)
    mean = cross_validate(subtype, bags, "mean", CFG)
    assert guided.pooled["auc"] >= 0.9, guided.pooled
    assert mean.pooled["auc"] <= 0.75, mean.pooled
    # the attention a guided head reports is its guide's: it lies on the focus
    focus = {s: np.argsort(bags[s].features[:, 0])[-2:] for s in subtype.slide_ids}
    mass = [guided.attention[s][focus[s]].sum() for s in subtype.slide_ids]
    assert np.median(mass) > 0.5


def test_guided_without_a_guide_is_the_mean_pool_head() -> None:
    """``fit_mean_classes`` with no guide pools by the mean (and gives MeanPoolLinear, not the guided form)."""
    _, subtype, bags = _cohort(n_patients=8)
    pairs = [(bags[s].features, int(y)) for s, y in zip(subtype.slide_ids, subtype.y)]
    model = fit_mean_classes(pairs, 0)
    assert not isinstance(model, GuidedLinear)
    uniform = FittedGuide(_Uniform(), frozenset())
    guided = fit_mean_classes(pairs, 0, uniform.model)
    with torch.no_grad():
        for bag, _ in pairs:
            torch.testing.assert_close(guided(torch.from_numpy(bag))[0], model(torch.from_numpy(bag))[0])


class _Uniform(torch.nn.Module):
    """A guide that attends evenly: guided pooling is then mean pooling."""

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return bag.mean(dim=0), torch.full((bag.shape[0],), 1.0 / bag.shape[0])
