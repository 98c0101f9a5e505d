"""Metrics of slide-level predictions, with bootstrap confidence intervals."""

from __future__ import annotations

import numpy as np
from scipy import stats


def classification(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """AUC (macro one-vs-rest when more than two classes), accuracy, balanced accuracy, macro F1."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    pred = proba.argmax(axis=1)
    out = {"accuracy": accuracy_score(y, pred), "balanced_accuracy": balanced_accuracy_score(y, pred),
           "f1": f1_score(y, pred, average="macro")}
    present = np.unique(y)
    if len(present) < 2:
        out["auc"] = float("nan")
    elif proba.shape[1] == 2:
        out["auc"] = roc_auc_score(y, proba[:, 1])
    else:
        cols = proba[:, present] / proba[:, present].sum(axis=1, keepdims=True)
        out["auc"] = roc_auc_score(y, cols, multi_class="ovr", labels=present) if len(present) > 2 else \
            roc_auc_score(y == present[1], cols[:, 1])
    return {k: float(v) for k, v in out.items()}


def bootstrap_ci(y: np.ndarray, proba: np.ndarray, metric: str, n: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of ``metric`` over ``n`` resamples of the slides (resamples with one class
    only are skipped for AUC)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if metric == "auc" and len(np.unique(y[idx])) < 2:
            continue
        values.append(classification(y[idx], proba[idx])[metric])
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def per_gene(genes: tuple[str, ...], fc_true: np.ndarray, fc_pred: np.ndarray, cls_true: np.ndarray,
             cls_proba: np.ndarray, mean_abs: np.ndarray) -> list[dict]:
    """Per gene: Pearson and Spearman of predicted vs true log2FC, AUC of the DE classes (macro one-vs-rest over
    the classes present; NaN for genes not classified) and the gene's mean |log2FC|."""
    rows = []
    for g, gene in enumerate(genes):
        known = ~np.isnan(fc_true[:, g])
        t, p = fc_true[known, g], fc_pred[known, g]
        varied = len(t) > 2 and np.std(t) > 0 and np.std(p) > 0
        row = {"gene": gene, "n": int(known.sum()), "mean_abs_log2fc": float(mean_abs[g]),
               "pearson": float(stats.pearsonr(t, p)[0]) if varied else float("nan"),
               "spearman": float(stats.spearmanr(t, p)[0]) if varied else float("nan"), "auc": float("nan")}
        used = (cls_true[:, g] >= 0) & np.isfinite(cls_proba[:, g]).all(axis=1)
        if used.sum() and len(np.unique(cls_true[used, g])) > 1:
            row["auc"] = classification(cls_true[used, g], cls_proba[used, g])["auc"]
        rows.append(row)
    return rows
