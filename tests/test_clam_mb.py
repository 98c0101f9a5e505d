"""CLAM_MB (``attention_mb``): the forward and the instance loss against transcriptions of CLAM's equations
(Lu et al. 2021, mahmoodlab/CLAM models/model_clam.py), bags of one, learning a synthetic MIL problem with
attention on its witness tiles, export with a dynamic number of tiles, and the cross-validation path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from histcode.config import HeadsConfig
from histcode.heads.cv import cross_validate
from histcode.heads.data import Bag
from histcode.heads.fit import Standardised, fit_head
from histcode.heads.models import CLAMMultiBranch, CLAMSingleBranch, WithTileScores
from histcode.heads.tasks import TASKS, TaskData


def clam_mb_reference(model: CLAMMultiBranch, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLAM_MB's forward written from CLAM's equations with plain tensor ops on the model's weights:
    h = ReLU(W_fc x + b); A = attention_c(tanh(W_a h) * sigmoid(W_b h)) (N x K) transposed to K x N and
    softmaxed over the N tiles; M = A h (K x hidden); logit c = classifiers[c](M[c]). Returns
    (probabilities (K,), A (K, N), h (N, hidden))."""
    fc = model.fc[0]
    h = torch.relu(bag @ fc.weight.T + fc.bias)
    att = model.attention
    a = torch.tanh(h @ att.tanh[0].weight.T + att.tanh[0].bias)
    b = torch.sigmoid(h @ att.sigmoid[0].weight.T + att.sigmoid[0].bias)
    A = ((a * b) @ att.score.weight.T + att.score.bias).T  # K x N
    A = torch.exp(A - A.max(dim=1, keepdim=True).values)
    A = A / A.sum(dim=1, keepdim=True)
    M = A @ h
    logits = torch.stack([(M[c] * clf.weight[0]).sum() + clf.bias[0] for c, clf in enumerate(model.classifiers)])
    return torch.softmax(logits, dim=0), A, h


def clam_mb_reference_loss(model: CLAMMultiBranch, bag: torch.Tensor, label: int, k_in: int, k_out: int,
                           subtyping: bool) -> float:
    """CLAM_MB's training loss as CLAM computes it with instance_eval: for each class i, inst_eval(A[i]) when i is
    the label (top-k of A[i] positive, bottom-k negative, classifier i), inst_eval_out(A[i]) otherwise when
    subtyping (top-k of A[i] negative), the sum divided by the number of classifiers when subtyping; total =
    bag_weight * CE(logits, label) + (1 - bag_weight) * instance loss. CLAM samples k_sample tiles either way;
    the model limits k (k_in to half the bag, k_out to the bag), which the caller passes here."""
    probs, A, h = clam_mb_reference(model, bag)
    bag_loss = -torch.log(probs[label])
    total_inst_loss = 0.0
    for i, classifier in enumerate(model.instance_classifiers):
        if i == label:
            top_p_ids = torch.topk(A[i][None], k_in)[1][-1]
            top_n_ids = torch.topk(-A[i][None], k_in, dim=1)[1][-1]
            instances = torch.cat([torch.index_select(h, 0, top_p_ids), torch.index_select(h, 0, top_n_ids)])
            targets = torch.cat([torch.full((k_in,), 1), torch.full((k_in,), 0)]).long()
            total_inst_loss += F.cross_entropy(classifier(instances), targets)
        elif subtyping:
            top_p_ids = torch.topk(A[i][None], k_out)[1][-1]
            total_inst_loss += F.cross_entropy(classifier(torch.index_select(h, 0, top_p_ids)),
                                               torch.full((k_out,), 0).long())
    if subtyping:
        total_inst_loss /= len(model.instance_classifiers)
    return float(model.bag_weight * bag_loss + (1 - model.bag_weight) * total_inst_loss)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_forward_equals_clams_multi_branch_equations(n_classes: int) -> None:
    torch.manual_seed(n_classes)
    model = CLAMMultiBranch(12, n_classes).eval()
    for n in (1, 2, 7, 40):
        bag = torch.randn(n, 12)
        with torch.no_grad():
            probs, attention = model(bag)
            _, branches, _ = model.pool(bag)
            ref_probs, ref_A, _ = clam_mb_reference(model, bag)
        assert probs.shape == (n_classes,) and attention.shape == (n,) and branches.shape == (n_classes, n)
        torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(branches, ref_A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attention, ref_A[int(ref_probs.argmax())])  # the predicted class's branch
        torch.testing.assert_close(branches.sum(dim=1), torch.ones(n_classes))


def test_branches_differ_per_class_and_single_branch_keys_are_unchanged() -> None:
    torch.manual_seed(0)
    model = CLAMMultiBranch(12, 3).eval()
    with torch.no_grad():
        _, branches, _ = model.pool(torch.randn(9, 12))
    assert not torch.allclose(branches[0], branches[1])  # one attention per class, not one shared
    sb = CLAMSingleBranch(12, 2)
    shapes = {k: tuple(v.shape) for k, v in sb.state_dict().items()}
    assert shapes["attention.score.weight"] == (1, 256) and shapes["classifier.weight"] == (2, 512)
    assert set(shapes) == {"fc.0.weight", "fc.0.bias", "attention.tanh.0.weight", "attention.tanh.0.bias",
                           "attention.sigmoid.0.weight", "attention.sigmoid.0.bias", "attention.score.weight",
                           "attention.score.bias", "classifier.weight", "classifier.bias",
                           *(f"instance_classifiers.{c}.{p}" for c in range(2) for p in ("weight", "bias"))}


@pytest.mark.parametrize("n_classes", [2, 3])
def test_tile_scores_are_the_forward_of_each_tile_as_a_bag_of_one(n_classes: int) -> None:
    torch.manual_seed(1)
    model = CLAMMultiBranch(12, n_classes).eval()
    bag = torch.randn(15, 12)
    with torch.no_grad():
        batched = model.tile_scores(bag)
        alone = torch.stack([model(bag[i:i + 1])[0] for i in range(len(bag))])
        _, one_tile_attention = model(bag[:1])
    assert batched.shape == (15, n_classes)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    assert float(one_tile_attention) == pytest.approx(1.0)


@pytest.mark.parametrize("subtyping", [False, True])
@pytest.mark.parametrize("label", [0, 1, 2])
@pytest.mark.parametrize(("n", "k"), [(10, 3), (5, 8)])  # k within the bag; k above half the bag (limited)
def test_loss_equals_clams_instance_evaluation_per_branch(subtyping: bool, label: int, n: int, k: int) -> None:
    torch.manual_seed(10 * label + n)
    model = CLAMMultiBranch(8, 3, k_sample=k, subtyping=subtyping).eval()  # no dropout: comparable
    bag = torch.randn(n, 8)
    k_in, k_out = min(k, n // 2), min(k, n)
    with torch.no_grad():
        expected = clam_mb_reference_loss(model, bag, label, k_in, k_out, subtyping)
        assert float(model.loss(bag, label)) == pytest.approx(expected, rel=1e-5)
    model.loss(bag, label).backward()
    trained = [c.weight.grad is not None for c in model.instance_classifiers]
    assert trained == ([True] * 3 if subtyping else [c == label for c in range(3)])
    assert all(c.weight.grad is not None for c in model.classifiers)  # every class's bag classifier


def test_instance_loss_reads_each_class_own_branch() -> None:
    """With branches that disagree, the in-class positives are the top tiles of the label's branch."""
    torch.manual_seed(3)
    model = CLAMMultiBranch(8, 2, k_sample=1).eval()
    with torch.no_grad():
        model.attention.score.weight[1] = -model.attention.score.weight[0]  # branch 1 ranks tiles backwards
        model.attention.score.bias.zero_()
    bag = torch.randn(6, 8)
    with torch.no_grad():
        h, A, _ = model.pool(bag)
        top, bottom = int(A[1].argmax()), int(A[1].argmin())
        assert top == int(A[0].argmin())
        expected = F.cross_entropy(model.instance_classifiers[1](h[[top, bottom]]), torch.tensor([1, 0]))
        bag_loss = -torch.log(model(bag)[0][1])
        assert float(model.loss(bag, 1)) == pytest.approx(float(0.7 * bag_loss + 0.3 * expected), rel=1e-5)


def test_one_tile_bag_never_labels_its_tile_both_ways() -> None:
    torch.manual_seed(0)
    for subtyping in (False, True):
        model = CLAMMultiBranch(8, 2, k_sample=8, subtyping=subtyping)
        loss = model.loss(torch.randn(1, 8), 1)
        assert torch.isfinite(loss)
        loss.backward()
        assert model.instance_classifiers[1].weight.grad is None  # in-class: no top and bottom tile to tell apart
        assert (model.instance_classifiers[0].weight.grad is not None) == subtyping  # out-of-class: top negative


def _mil_bags(rng: np.random.Generator, n_bags: int, n_tiles: int = 20, dim: int = 8, witnesses: int = 3,
              shift: float = 2.5) -> list[tuple[np.ndarray, int, np.ndarray]]:
    """(bag, label, which tiles are shifted): a positive bag holds ``witnesses`` tiles moved by ``shift`` along
    the first two features; the rest of every bag is N(0, 1) noise."""
    out = []
    for i in range(n_bags):
        label = i % 2
        bag = rng.normal(size=(n_tiles, dim)).astype(np.float32)
        shifted = np.zeros(n_tiles, dtype=bool)
        if label:
            shifted[rng.choice(n_tiles, witnesses, replace=False)] = True
            bag[shifted, :2] += shift
        out.append((bag, label, shifted))
    return out


def test_learns_a_synthetic_mil_problem_and_attends_to_its_witness_tiles() -> None:
    rng = np.random.default_rng(0)
    train, val, test = _mil_bags(rng, 40), _mil_bags(rng, 12), _mil_bags(rng, 30)
    cfg = HeadsConfig(epochs=25, min_epochs=5, patience=6, lr=5e-4, k_sample=2, device="cpu")
    head = fit_head(TASKS["tumor"], "attention_mb", [(b, y) for b, y, _ in train], [(b, y) for b, y, _ in val],
                    {"classes": 2, "genes": 0}, cfg, seed=0)
    assert isinstance(head.model, Standardised) and isinstance(head.model.head, CLAMMultiBranch)
    predicted = [head.predict(b) for b, _, _ in test]
    y = np.array([t for _, t, _ in test])
    assert roc_auc_score(y, [p[1] for p, _ in predicted]) > 0.85  # chance: 0.5
    attention_auc = [roc_auc_score(shifted, a) for (_, t, shifted), (_, a) in zip(test, predicted) if t == 1]
    assert np.mean(attention_auc) > 0.8  # the shifted tiles are attended first


@pytest.mark.parametrize("standardised", [False, True])
def test_exports_with_a_dynamic_number_of_tiles(standardised: bool, tmp_path) -> None:
    """As ``Tracker.log_torch_model`` exports (MLflow's pt2 format): torch.export on a two-tile example with the
    tile dimension ``Dim.AUTO``; the saved and reloaded program answers bags of other sizes as the module does."""
    torch.manual_seed(0)
    head = CLAMMultiBranch(16, 2, subtyping=True)
    if standardised:
        head = Standardised(head, np.full(16, 0.3, dtype=np.float32), np.full(16, 2.0, dtype=np.float32))
    model = WithTileScores(head).eval()
    example = torch.from_numpy(np.random.default_rng(0).random((2, 16), dtype=np.float32))
    program = torch.export.export(model, (example,), dynamic_shapes=[{0: torch.export.Dim.AUTO}])
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    for n in (3, 50):
        bag = torch.randn(n, 16)
        with torch.no_grad():
            expected, got = model(bag), loaded(bag)
        assert [tuple(t.shape) for t in got] == [(2,), (n,), (n, 2)]
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def _synthetic_task(name: str, classes: tuple[str, str], n_patients: int = 9) -> tuple[TaskData, dict[str, Bag]]:
    """Two slides per patient, folds by patient; class-1 bags hold a few shifted tiles."""
    rng = np.random.default_rng(1)
    slides, patients, y, bags = [], [], [], {}
    for p in range(n_patients):
        for s in range(2):
            sid, label = f"P{p}-S{s}", (p + s) % 2
            feats = rng.normal(size=(12, 8)).astype(np.float32)
            feats[:4] += label * 2.0
            bags[sid] = Bag(sid, f"P{p}", feats, [f"{sid}-t{i}" for i in range(12)], np.zeros((12, 2)), 256)
            slides.append(sid), patients.append(f"P{p}"), y.append(label)
    folds = np.array([int(p[1:]) % 3 for p in patients])
    return TaskData(name, slides, np.array(patients), folds, np.array(y), classes), bags


@pytest.mark.parametrize(("task", "classes"), [("tumor", ("normal", "tumor")), ("subtype", ("LUAD", "LUSC"))])
def test_cross_validation_predicts_every_slide_out_of_fold(task: str, classes: tuple[str, str]) -> None:
    assert "attention_mb" in TASKS[task].aggregators and "attention_mb" not in TASKS["de"].aggregators
    cfg = HeadsConfig(epochs=8, min_epochs=2, patience=3, lr=1e-3, bootstrap=20, k_sample=2, device="cpu")
    built = TASKS[task].torch_model("attention_mb", 8, {"classes": 2, "genes": 0}, cfg)
    assert isinstance(built, CLAMMultiBranch) and built.subtyping == (task == "subtype")
    data, bags = _synthetic_task(task, classes)
    result = cross_validate(data, bags, "attention_mb", cfg)
    assert result.aggregator == "attention_mb" and len(result.fold_metrics) == 3
    predictions = result.predictions
    assert sorted(predictions.slide_id) == sorted(data.slide_ids)
    fold_of = dict(zip(data.slide_ids, data.folds))
    assert all(fold_of[s] == f for s, f in zip(predictions.slide_id, predictions.fold))  # each in its own test fold
    proba = predictions[[f"p_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert set(result.attention) == set(data.slide_ids)
    assert all(result.attention[s].shape == (12,) for s in data.slide_ids)
    assert np.isfinite(result.pooled["auc"])
