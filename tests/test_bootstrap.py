"""Patient-level (cluster) bootstrap: resamples keep patients whole, intervals agree with plain loops written here
from the definitions, correlated slides of one patient widen the interval, and the fast rank AUC / vectorised
Pearson equal sklearn's and scipy's."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from histcode.heads import metrics


def slide_bootstrap_ci(y: np.ndarray, proba: np.ndarray, metric: str, n: int, seed: int) -> tuple[float, float]:
    """The reference: a plain bootstrap of the slides (not patients), one loop per resample, AUC resamples with
    one class skipped, 95% percentile interval."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if metric == "auc" and len(np.unique(y[idx])) < 2:
            continue
        values.append(metrics.classification(y[idx], proba[idx])[metric])
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _groups(rng: np.random.Generator, n_patients: int, max_slides: int = 3) -> np.ndarray:
    """Patient ids (strings, rows shuffled) with 1..max_slides slides each."""
    ids = np.concatenate([[f"P{p:03d}"] * int(rng.integers(1, max_slides + 1)) for p in range(n_patients)])
    return ids[rng.permutation(len(ids))]


def _reference_resamples(groups: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """The documented drawing rule, written out: P sorted unique patients, per resample rng.integers(0, P, P),
    all rows of every drawn patient (row order) concatenated in draw order."""
    patients = sorted(set(groups.tolist()))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        drawn = rng.integers(0, len(patients), len(patients))
        out.append(np.array([i for d in drawn for i in range(len(groups)) if groups[i] == patients[d]], dtype=int))
    return out


def _percentile_interval(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not np.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def _assert_interval(got: tuple[float, float], want: tuple[float, float]) -> None:
    np.testing.assert_allclose(np.array(got, dtype=float), np.array(want, dtype=float), rtol=0, atol=1e-12,
                               equal_nan=True)


# --- resamples -------------------------------------------------------------------------------------------------

def test_resamples_keep_patients_whole_with_right_sizes_and_are_deterministic() -> None:
    rng = np.random.default_rng(1)
    groups = _groups(rng, 12)
    patients = np.unique(groups)
    rows_of = {p: np.flatnonzero(groups == p) for p in patients}
    res = metrics.patient_resamples(groups, 50, seed=7)
    assert len(res) == 50
    for idx in res:
        mult = np.bincount(idx, minlength=len(groups))
        drawn = {}
        for p in patients:
            m = mult[rows_of[p]]
            assert (m == m[0]).all(), "a patient's rows must appear together, equally often"
            drawn[p] = int(m[0])
        assert sum(drawn.values()) == len(patients)  # P patients drawn with replacement
        assert len(idx) == sum(drawn[p] * len(rows_of[p]) for p in patients)
    again = metrics.patient_resamples(groups, 50, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(res, again))
    other = metrics.patient_resamples(groups, 50, seed=8)
    assert not all(len(a) == len(b) and np.array_equal(a, b) for a, b in zip(res, other))


def test_resamples_follow_the_documented_drawing_rule() -> None:
    groups = _groups(np.random.default_rng(2), 9)
    got = metrics.patient_resamples(groups, 30, seed=3)
    want = _reference_resamples(groups, 30, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


# --- classification intervals -----------------------------------------------------------------------------------

def test_one_slide_per_patient_equals_a_plain_slide_bootstrap() -> None:
    rng = np.random.default_rng(4)
    n_slides, n, seed = 30, 100, 11
    y = rng.integers(0, 2, n_slides)
    score = np.round(np.clip(0.3 * y + rng.normal(0.35, 0.25, n_slides), 0, 1), 1)  # ties on purpose
    proba = np.stack([1 - score, score], axis=1)
    # the slide bootstrap, written from scratch: each resample draws len(y) slides with replacement
    draw = np.random.default_rng(seed)
    aucs, baccs = [], []
    for _ in range(n):
        idx = draw.integers(0, n_slides, n_slides)
        baccs.append(balanced_accuracy_score(y[idx], proba[idx].argmax(axis=1)))
        aucs.append(roc_auc_score(y[idx], score[idx]) if len(np.unique(y[idx])) == 2 else np.nan)
    got = metrics.bootstrap_classification(y, proba, np.arange(n_slides), ("auc", "balanced_accuracy"), n, seed)
    _assert_interval(got["auc"], _percentile_interval(aucs))
    _assert_interval(got["balanced_accuracy"], _percentile_interval(baccs))
    # and a plain slide bootstrap gives the same (same drawing rule)
    _assert_interval(got["auc"], slide_bootstrap_ci(y, proba, "auc", n, seed))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_patient_intervals_match_a_loop_over_the_resamples(n_classes: int) -> None:
    rng = np.random.default_rng(5 + n_classes)
    groups = _groups(rng, 14)
    n_slides, n, seed = len(groups), 80, 5
    # the third class is rare, so that many resamples hold only some classes
    y = rng.choice(n_classes, n_slides, p=[0.5, 0.5] if n_classes == 2 else [0.45, 0.45, 0.1])
    proba = rng.dirichlet(np.ones(n_classes), n_slides)
    proba[: n_slides // 3] = np.round(proba[: n_slides // 3], 1) + 1e-3  # some ties
    proba /= proba.sum(axis=1, keepdims=True)
    names = ("auc", "accuracy", "balanced_accuracy", "f1")
    want = {m: [] for m in names}
    for idx in _reference_resamples(groups, n, seed):
        point = metrics.classification(y[idx], proba[idx])  # the definition of every metric
        for m in names:
            want[m].append(point[m])
    got = metrics.bootstrap_classification(y, proba, groups, names, n, seed)
    for m in names:
        _assert_interval(got[m], _percentile_interval(want[m]))


def test_correlated_slides_of_a_patient_widen_the_interval() -> None:
    rng = np.random.default_rng(6)
    n_patients, n, seed = 40, 200, 0
    y_patient = rng.integers(0, 2, n_patients)
    score_patient = np.clip(0.5 + 0.25 * (2 * y_patient - 1) + rng.normal(0, 0.3, n_patients), 0.01, 0.99)
    # two slides per patient, nearly the same prediction and the same label
    y = np.repeat(y_patient, 2)
    score = np.clip(np.repeat(score_patient, 2) + rng.normal(0, 0.01, 2 * n_patients), 0.0, 1.0)
    proba = np.stack([1 - score, score], axis=1)
    groups = np.repeat(np.arange(n_patients), 2)
    patient = metrics.bootstrap_classification(y, proba, groups, ("auc", "balanced_accuracy"), n, seed)
    for m in ("auc", "balanced_accuracy"):
        slide = slide_bootstrap_ci(y, proba, m, n, seed)
        width_patient, width_slide = patient[m][1] - patient[m][0], slide[1] - slide[0]
        assert width_patient > 1.2 * width_slide, (m, patient[m], slide)


def test_auc_skips_one_class_resamples_and_is_nan_when_impossible() -> None:
    # patient "A" holds the only positive, scored highest: every resample with it has AUC 1, the others none
    groups = np.array(["A", "B", "B", "C", "D", "E", "F"])
    y = np.array([1, 0, 0, 0, 0, 0, 0])
    score = np.array([0.9, 0.1, 0.2, 0.3, 0.3, 0.4, 0.5])
    proba = np.stack([1 - score, score], axis=1)
    n, seed = 200, 1
    with_a = sum(0 in idx for idx in metrics.patient_resamples(groups, n, seed))
    assert 0 < with_a < n  # some resamples lack a positive
    got = metrics.bootstrap_classification(y, proba, groups, ("auc", "balanced_accuracy"), n, seed)
    assert got["auc"] == (1.0, 1.0)
    assert np.isfinite(got["balanced_accuracy"]).all()
    # one class only: no resample can give an AUC
    none = metrics.bootstrap_classification(np.zeros(7, int), proba, groups, ("auc", "accuracy"), n, seed)
    assert np.isnan(none["auc"]).all() and np.isfinite(none["accuracy"]).all()
    with pytest.raises(ValueError):
        metrics.bootstrap_classification(y, proba, groups, ("kappa",), n, seed)


# --- fast AUC and Pearson ----------------------------------------------------------------------------------------

def test_rank_auc_equals_sklearn_with_ties() -> None:
    rng = np.random.default_rng(8)
    for trial in range(20):
        m = int(rng.integers(6, 40))
        # binary, two probability columns, heavy ties
        y = rng.integers(0, 2, m)
        y[:2] = [0, 1]
        s = rng.integers(0, 5, m) / 4.0
        proba = np.stack([1 - s, s], axis=1)
        assert metrics.auc_score(y, proba) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        # three classes, only some present: macro one-vs-rest over the present ones, renormalised
        p3 = rng.dirichlet(np.ones(3), m)
        p3[: m // 2] = np.round(p3[: m // 2], 1) + 0.05
        for present in ([0, 1, 2], [0, 2], [1, 2]):
            y3 = rng.choice(present, m)
            y3[: len(present)] = present
            cols = p3[:, present] / p3[:, present].sum(axis=1, keepdims=True)
            if len(present) > 2:
                want = roc_auc_score(y3, cols, multi_class="ovr", labels=present, average="macro")
            else:
                want = roc_auc_score(y3 == present[1], cols[:, 1])
            assert metrics.auc_score(y3, p3) == pytest.approx(want, abs=1e-12), (trial, present)
            assert metrics.auc_score(y3, p3) == pytest.approx(metrics.classification(y3, p3)["auc"], abs=1e-12)
    assert np.isnan(metrics.auc_score(np.zeros(5, int), rng.dirichlet(np.ones(3), 5)))


def test_resample_auc_and_pearson_equal_sklearn_and_scipy_on_expanded_resamples() -> None:
    rng = np.random.default_rng(9)
    m, n = 25, 40
    counts = rng.integers(0, 3, (n, m)).astype(float)
    y2 = rng.integers(0, 2, m)
    s = rng.integers(0, 6, m) / 5.0
    y3 = rng.choice(3, m, p=[0.45, 0.45, 0.1])
    p3 = rng.dirichlet(np.ones(3), m)
    p3[::3] = np.round(p3[::3], 1) + 0.05
    x = rng.normal(size=m)
    x[::4] = 0.5  # ties
    z = 0.6 * x + rng.normal(size=m)
    auc2 = metrics._weighted_auc(counts, y2, np.stack([1 - s, s], axis=1))
    auc3 = metrics._weighted_auc(counts, y3, p3)
    r = metrics._weighted_pearson(counts, x, z)
    for b in range(n):
        idx = np.repeat(np.arange(m), counts[b].astype(int))
        if len(np.unique(y2[idx])) == 2:
            assert auc2[b] == pytest.approx(roc_auc_score(y2[idx], s[idx]), abs=1e-12)
        else:
            assert np.isnan(auc2[b])
        want3 = metrics.classification(y3[idx], p3[idx])["auc"] if len(idx) else np.nan
        np.testing.assert_allclose(auc3[b], want3, atol=1e-12, equal_nan=True)
        assert r[b] == pytest.approx(stats.pearsonr(x[idx], z[idx])[0], abs=1e-10)
    assert metrics.pearson(x, z) == pytest.approx(stats.pearsonr(x, z)[0], abs=1e-12)
    assert np.isnan(metrics.pearson(np.ones(5), np.arange(5.0)))
    assert np.isnan(metrics.pearson(np.arange(2.0), np.arange(2.0)))


# --- DE intervals ----------------------------------------------------------------------------------------------

def _de_case(rng: np.random.Generator, n_patients: int, n_genes: int, noise: np.ndarray) -> tuple:
    """A tumour and a matched normal per patient (some without normal); per-gene prediction noise."""
    groups = np.concatenate([[p, p] if p % 4 else [p] for p in range(n_patients)])
    n_slides = len(groups)
    fc_true = rng.normal(0, 1.5, (n_slides, n_genes))
    fc_true[rng.random((n_slides, n_genes)) < 0.1] = np.nan
    fc_pred = np.nan_to_num(fc_true) + rng.normal(0, 1, (n_slides, n_genes)) * noise
    cls_true = np.where(fc_true > 1, 2, np.where(fc_true < -1, 0, 1))
    cls_true[np.isnan(fc_true)] = -1
    logits = np.stack([-fc_pred, np.zeros_like(fc_pred), fc_pred], axis=2) * 2
    cls_proba = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    return groups, fc_true, fc_pred, cls_true, cls_proba


def test_gene_intervals_match_a_loop_over_per_gene_and_respect_the_summary_mask() -> None:
    rng = np.random.default_rng(10)
    noise = np.array([0.3, 0.3, 0.5, 3.0, 3.0])
    groups, fc_true, fc_pred, cls_true, cls_proba = _de_case(rng, 16, 5, noise)
    cls_true[:, 1] = -1  # gene 1 not classified
    cls_proba[:, 2] = np.nan  # gene 2: the head has no classifier
    genes = tuple(f"g{g}" for g in range(5))
    summary = np.array([True, True, True, False, False])  # leave out the noisy genes
    n, seed = 60, 3
    per = {k: [] for k in ("auc", "pearson", "mean_auc", "mean_pearson", "mean_auc_all", "mean_pearson_all")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for idx in _reference_resamples(groups, n, seed):
            rows = metrics.per_gene(genes, fc_true[idx], fc_pred[idx], cls_true[idx], cls_proba[idx], np.zeros(5))
            a = np.array([r["auc"] for r in rows])
            p = np.array([r["pearson"] for r in rows])
            per["auc"].append(a)
            per["pearson"].append(p)
            for key, vals, mask in (("mean_auc", a, summary), ("mean_pearson", p, summary),
                                    ("mean_auc_all", a, np.ones(5, bool)), ("mean_pearson_all", p, np.ones(5, bool))):
                v = vals[mask]
                per[key].append(float(np.mean(v[~np.isnan(v)])) if (~np.isnan(v)).any() else np.nan)
    got = metrics.bootstrap_genes(fc_true, fc_pred, cls_true, cls_proba, groups, n, seed, summary=summary)
    got_all = metrics.bootstrap_genes(fc_true, fc_pred, cls_true, cls_proba, groups, n, seed)
    auc, pear = np.array(per["auc"]), np.array(per["pearson"])
    assert len(got["genes"]) == 5
    for g, row in enumerate(got["genes"]):
        _assert_interval((row["auc_ci_low"], row["auc_ci_high"]), _percentile_interval(list(auc[:, g])))
        _assert_interval((row["pearson_ci_low"], row["pearson_ci_high"]), _percentile_interval(list(pear[:, g])))
    assert np.isnan([got["genes"][1]["auc_ci_low"], got["genes"][2]["auc_ci_high"]]).all()
    _assert_interval(got["mean_gene_auc_ci"], _percentile_interval(per["mean_auc"]))
    _assert_interval(got["mean_gene_pearson_ci"], _percentile_interval(per["mean_pearson"]))
    _assert_interval(got_all["mean_gene_auc_ci"], _percentile_interval(per["mean_auc_all"]))
    _assert_interval(got_all["mean_gene_pearson_ci"], _percentile_interval(per["mean_pearson_all"]))
    # leaving out the noisy genes raises the mean Pearson interval
    assert got["mean_gene_pearson_ci"][0] > got_all["mean_gene_pearson_ci"][0]
    none = metrics.bootstrap_genes(fc_true, fc_pred, cls_true, cls_proba, groups, n, seed, summary=np.zeros(5, bool))
    assert np.isnan(none["mean_gene_auc_ci"]).all() and np.isnan(none["mean_gene_pearson_ci"]).all()


def test_gene_intervals_contain_the_point_estimates_for_a_clear_signal() -> None:
    rng = np.random.default_rng(12)
    n_genes = 15
    groups, fc_true, fc_pred, cls_true, cls_proba = _de_case(rng, 28, n_genes, np.full(n_genes, 0.4))
    assert len(groups) == 49
    genes = tuple(f"g{g}" for g in range(n_genes))
    rows = metrics.per_gene(genes, fc_true, fc_pred, cls_true, cls_proba, np.zeros(n_genes))
    start = time.perf_counter()
    got = metrics.bootstrap_genes(fc_true, fc_pred, cls_true, cls_proba, groups, 1000, 0)
    print(f"bootstrap_genes n=1000, {len(groups)} slides x {n_genes} genes: {time.perf_counter() - start:.3f} s")
    for point, ci in zip(rows, got["genes"]):
        assert ci["pearson_ci_low"] <= point["pearson"] <= ci["pearson_ci_high"]
        assert ci["auc_ci_low"] <= point["auc"] <= ci["auc_ci_high"]
        assert ci["pearson_ci_low"] > 0.5 and ci["auc_ci_low"] > 0.6  # a clear signal stays clear
    mean_auc = np.mean([r["auc"] for r in rows])
    mean_pearson = np.mean([r["pearson"] for r in rows])
    assert got["mean_gene_auc_ci"][0] <= mean_auc <= got["mean_gene_auc_ci"][1]
    assert got["mean_gene_pearson_ci"][0] <= mean_pearson <= got["mean_gene_pearson_ci"][1]
    # the mean over genes is tighter than any one gene
    width = got["mean_gene_pearson_ci"][1] - got["mean_gene_pearson_ci"][0]
    assert width < min(ci["pearson_ci_high"] - ci["pearson_ci_low"] for ci in got["genes"])
