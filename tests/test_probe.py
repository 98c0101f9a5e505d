"""The linear probe's statistics and protocol: rank AUCs against scikit-learn, paired group-resampled
intervals, a fixed group-wise split into a tuning and a reporting half, and the three tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from histcode.config import ProbeConfig
from histcode.ssl.probe import ProbeSet, probe_report, split_halves, tasks
from histcode.ssl.probe_stats import auc, auc_binary, paired_difference

CLASSES = ("lung_aca", "lung_n", "lung_scc")


def _probe(n_groups: int = 60, per_group: int = 2, seed: int = 0) -> ProbeSet:
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.integers(0, 3, n_groups), per_group)
    groups = np.repeat([f"g{i}" for i in range(n_groups)], per_group)
    return ProbeSet(torch.zeros(len(labels), 3, 2, 2, dtype=torch.uint8), labels, groups, CLASSES)


def test_rank_auc_equals_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # rounded: many ties
    assert auc_binary(y == 1, s) == pytest.approx(roc_auc_score(y, s))
    y3 = rng.integers(0, 3, 300)
    proba = rng.dirichlet(np.ones(3), 300) + np.eye(3)[y3] * 0.3
    assert auc(y3, proba) == pytest.approx(roc_auc_score(y3, proba / proba.sum(1, keepdims=True), multi_class="ovr"))
    assert np.isnan(auc_binary(np.ones(4, bool), np.arange(4)))


def test_paired_difference_resamples_whole_groups() -> None:
    rng = np.random.default_rng(2)
    n = 120
    y = rng.integers(0, 2, n)
    good = np.stack([1 - (y + rng.normal(0, 0.6, n)), y + rng.normal(0, 0.6, n)], 1)
    poor = np.stack([np.zeros(n), y + rng.normal(0, 2.0, n)], 1)
    same = paired_difference(y, np.arange(n), good, good, 200, 0)
    assert same == (0.0, 0.0, 0.0)
    d, lo, hi = paired_difference(y, np.arange(n), good, poor, 300, 0)
    assert d == pytest.approx(auc(y, good) - auc(y, poor)) and 0 < lo < d < hi
    # every tile twice, as near-copies: resampled as pairs, the interval is that of n tiles; resampled as
    # independent tiles it would pretend to twice the data and come out narrower
    y2, g2 = np.repeat(y, 2), np.repeat(np.arange(n), 2)
    grouped = paired_difference(y2, g2, np.repeat(good, 2, 0), np.repeat(poor, 2, 0), 300, 0)
    naive = paired_difference(y2, np.arange(2 * n), np.repeat(good, 2, 0), np.repeat(poor, 2, 0), 300, 0)
    assert (grouped[2] - grouped[1]) > 1.2 * (naive[2] - naive[1])
    assert (grouped[2] - grouped[1]) == pytest.approx(hi - lo, rel=0.35)
    assert np.isnan(paired_difference(y, np.arange(n), good, poor, 0, 0)[1])


def test_halves_keep_groups_whole_and_are_fixed_by_their_seed() -> None:
    probe = _probe()
    halves = split_halves(probe, 0)
    tune, report = halves["tune"], halves["report"]
    assert not set(probe.groups[tune]) & set(probe.groups[report])
    assert len(tune) + len(report) == len(probe.labels)
    for c in range(3):  # stratified: each class in both halves, about evenly
        a, b = (probe.labels[tune] == c).sum(), (probe.labels[report] == c).sum()
        assert a > 0 and b > 0 and abs(a - b) <= 0.4 * (a + b)
    assert np.array_equal(split_halves(probe, 0)["report"], report)
    assert not np.array_equal(split_halves(probe, 1)["report"], report)


def test_the_three_tasks() -> None:
    probe = _probe()
    by = {t.name: t for t in tasks(probe)}
    names = np.array(CLASSES)[probe.labels]
    assert np.array_equal(by["tissue"].y, probe.labels)
    assert np.array_equal(by["tumour"].y, (names != "lung_n").astype(int))
    sub = by["subtype"]
    assert set(names[sub.rows]) == {"lung_aca", "lung_scc"}
    assert np.array_equal(sub.y, (names[sub.rows] == "lung_scc").astype(int))


def test_probe_report_tells_an_informative_encoder_from_noise_on_the_reporting_half_only() -> None:
    probe = _probe(n_groups=80)
    rng = np.random.default_rng(3)
    informative = np.eye(3)[probe.labels] * 2 + rng.normal(0, 1, (len(probe.labels), 3))
    noise = rng.normal(0, 1, (len(probe.labels), 3))
    features = {"": {"trained": informative, "random_init": noise, "colour": noise[:, ::-1].copy()},
                "/restained": {"trained": informative, "random_init": noise, "colour": noise}}
    out = probe_report(features, probe, ProbeConfig(folds=3, bootstrap=200), seed=0)
    for task in ("tissue", "tumour", "subtype"):
        assert out[f"probe/report/{task}/trained_auc"] > 0.85 > out[f"probe/report/{task}/random_init_auc"]
        assert out[f"probe/report/{task}/gain_vs_random_init_ci_low"] > 0
        assert out[f"probe/tune/{task}/trained_auc"] > 0.85
    assert not any(k.startswith("probe/tune") and "gain" in k for k in out)
    assert out["probe/tune/tiles"] + out["probe/report/tiles"] == out["probe_tiles"] == len(probe.labels)
