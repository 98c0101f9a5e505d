"""Statistics of the linear probe: rank AUCs and paired, grouped bootstrap intervals of a difference of AUCs.

Two encoders probed on the same tiles are compared on the same resamples: each resample draws the tiles'
groups (LC25000's near-copies of one photograph) with replacement, both encoders' out-of-fold predictions are
scored on it, and the 2.5th and 97.5th percentiles of the difference make the 95% interval. Resampling groups,
not tiles, keeps near-copies together, as the cross-validation does.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def auc_binary(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for the positives of boolean ``y`` (Mann-Whitney U over mid-ranks; ties count
    half); NaN when either class is absent."""
    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(y: np.ndarray, proba: np.ndarray) -> float:
    """AUC of class probabilities (n, k) for class ids ``y``: the second column's for two classes, else the
    macro mean of the one-vs-rest AUCs of the classes present."""
    y = np.asarray(y)
    if proba.shape[1] == 2:
        return auc_binary(y == 1, proba[:, 1])
    values = [auc_binary(y == c, proba[:, c]) for c in range(proba.shape[1]) if (y == c).any()]
    return float(np.nanmean(values)) if values else float("nan")


def paired_difference(y: np.ndarray, groups: np.ndarray, proba_a: np.ndarray, proba_b: np.ndarray,
                      resamples: int, seed: int) -> tuple[float, float, float]:
    """(AUC(a) - AUC(b), and its 95% interval) over ``resamples`` group resamples of the same tiles; the
    interval is NaN when ``resamples`` is 0 or no resample holds every class."""
    point = auc(y, proba_a) - auc(y, proba_b)
    if resamples <= 0:
        return point, float("nan"), float("nan")
    names, index = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(index == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(names), len(names))])
        d = auc(y[rows], proba_a[rows]) - auc(y[rows], proba_b[rows])
        if np.isfinite(d):
            diffs.append(d)
    if not diffs:
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return point, float(lo), float(hi)
