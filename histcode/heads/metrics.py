"""Metrics of slide-level predictions, with patient-level bootstrap confidence intervals."""

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


# --- Patient-level (cluster) bootstrap -------------------------------------------------------------------------
#
# Every interval resamples patients, not slides: a patient's slides (a tumour and its matched normal, several
# blocks) are drawn together, so that their correlation is not mistaken for independent evidence. A resample is
# held as a vector of row multiplicities (how many times each slide is in it); every metric below is computed
# from those counts, vectorised over the resamples, with exactly the value it has on the expanded resample.

_CLASSIFICATION_METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")


def _patient_draws(groups: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the patient index of every row, into ``np.unique(groups)``; the (n, patients) drawn patient indices).
    The drawing rule: ``rng = np.random.default_rng(seed)``, then per resample ``rng.integers(0, P, P)``; with
    one slide per patient in row order the draws are those of a plain slide bootstrap with the same seed."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) == 0:
        raise ValueError("groups: one patient id per row, at least one row")
    _, inverse = np.unique(groups, return_inverse=True)
    n_patients = int(inverse.max()) + 1
    rng = np.random.default_rng(seed)
    draws = np.empty((int(n), n_patients), dtype=np.int64)
    for b in range(int(n)):
        draws[b] = rng.integers(0, n_patients, n_patients)
    return inverse.ravel(), draws


def _row_counts(groups: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(n, rows) multiplicity of every row in each of the ``patient_resamples``."""
    inverse, draws = _patient_draws(groups, n, seed)
    n_patients = draws.shape[1]
    offsets = (np.arange(len(draws))[:, None] * n_patients + draws).ravel()
    per_patient = np.bincount(offsets, minlength=len(draws) * n_patients).reshape(len(draws), n_patients)
    return per_patient[:, inverse].astype(np.float64)


def patient_resamples(groups: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """``n`` resamples of row indices, by patient: each draws ``P = len(np.unique(groups))`` patients with
    replacement (``rng = np.random.default_rng(seed)``, then per resample ``rng.integers(0, P, P)`` indexing the
    sorted unique patients) and takes all rows of every drawn patient, in row order, concatenated in draw order
    (a patient drawn twice contributes its rows twice). Deterministic for a seed."""
    inverse, draws = _patient_draws(groups, n, seed)
    rows = [np.flatnonzero(inverse == p) for p in range(draws.shape[1])]
    return [np.concatenate([rows[p] for p in draw]) for draw in draws]


def _weighted_binary_auc(counts: np.ndarray, pos: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC AUC of ``score`` for the positives ``pos`` in every resample (rows of ``counts``), by the
    Mann-Whitney U with average ranks for ties: a tie group of total weight G above B lower-scored draws holds
    the ranks B+1..B+G, average B + (G+1)/2. NaN where a resample lacks positives or negatives."""
    _, tie = np.unique(score, return_inverse=True)
    tie = tie.ravel()
    onehot = np.zeros((len(score), int(tie.max()) + 1))
    onehot[np.arange(len(score)), tie] = 1.0
    weight = counts @ onehot  # (resamples, tie groups)
    weight_pos = counts[:, pos] @ onehot[pos]
    mid_rank = np.cumsum(weight, axis=1) - weight + (weight + 1.0) / 2.0
    n_pos = weight_pos.sum(axis=1)
    n_neg = weight.sum(axis=1) - n_pos
    u = (weight_pos * mid_rank).sum(axis=1) - n_pos * (n_pos + 1.0) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = u / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _weighted_auc(counts: np.ndarray, y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Per resample, the AUC of ``classification``: binary on ``proba[:, 1]`` with two columns; otherwise over
    the classes present in the resample, the probabilities renormalised over them, binary for two present
    classes and macro one-vs-rest for more. NaN where the resample holds fewer than two classes."""
    y = np.asarray(y).astype(np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    n_classes = max(proba.shape[1], int(y.max()) + 1)
    present = (counts @ np.eye(n_classes)[y]) > 0  # (resamples, classes)
    code = present @ (1 << np.arange(n_classes))
    out = np.full(len(counts), np.nan)
    for c in np.unique(code):
        classes = np.flatnonzero((int(c) >> np.arange(n_classes)) & 1)
        if len(classes) < 2:
            continue
        which = code == c
        rows = np.isin(y, classes)
        sub, yy = counts[np.ix_(which, rows)], y[rows]
        if proba.shape[1] == 2:
            out[which] = _weighted_binary_auc(sub, yy == 1, proba[rows, 1])
            continue
        cols = proba[np.ix_(rows, classes)]
        cols = cols / cols.sum(axis=1, keepdims=True)
        if len(classes) == 2:
            out[which] = _weighted_binary_auc(sub, yy == classes[1], cols[:, 1])
        else:
            out[which] = np.mean([_weighted_binary_auc(sub, yy == k, cols[:, j]) for j, k in enumerate(classes)],
                                 axis=0)
    return out


def _weighted_pearson(counts: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of x and y per resample; NaN where ``per_gene`` gives NaN: at most two draws, x or y constant
    over the drawn rows (or a non-finite value drawn)."""
    x, y = np.asarray(x, dtype=np.float64).copy(), np.asarray(y, dtype=np.float64).copy()
    bad = ~(np.isfinite(x) & np.isfinite(y))
    x[bad], y[bad] = 0.0, 0.0
    drawn = counts > 0
    varied_x = np.where(drawn, x, np.inf).min(axis=1) < np.where(drawn, x, -np.inf).max(axis=1)
    varied_y = np.where(drawn, y, np.inf).min(axis=1) < np.where(drawn, y, -np.inf).max(axis=1)
    total = counts.sum(axis=1)
    ok = (total > 2) & varied_x & varied_y & ~(drawn[:, bad].any(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = x[None, :] - ((counts @ x) / total)[:, None]
        dy = y[None, :] - ((counts @ y) / total)[:, None]
        r = (counts * dx * dy).sum(axis=1) / np.sqrt((counts * dx * dx).sum(axis=1) * (counts * dy * dy).sum(axis=1))
    return np.where(ok, np.clip(r, -1.0, 1.0), np.nan)


def auc_score(y: np.ndarray, proba: np.ndarray) -> float:
    """The AUC of ``classification`` computed from ranks (no sklearn): NaN with fewer than two classes."""
    return float(_weighted_auc(np.ones((1, len(y))), y, proba)[0])


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r (NaN for at most two points or a constant input), vectorised."""
    return float(_weighted_pearson(np.ones((1, len(x))), x, y)[0])


def _interval(values: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the defined (non-NaN) values; (nan, nan) if none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def _weighted_classification(counts: np.ndarray, y: np.ndarray, proba: np.ndarray, metric: str) -> np.ndarray:
    """Per resample, ``classification(y[idx], proba[idx])[metric]``."""
    if metric == "auc":
        return _weighted_auc(counts, y, proba)
    y = np.asarray(y).astype(np.int64)
    pred = np.asarray(proba).argmax(axis=1)
    n_classes = max(np.asarray(proba).shape[1], int(y.max()) + 1)
    eye = np.eye(n_classes)
    true_n = counts @ eye[y]  # (resamples, classes)
    pred_n = counts @ eye[pred]
    hits = counts @ (eye[y] * (y == pred)[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "accuracy":
            return hits.sum(axis=1) / counts.sum(axis=1)
        if metric == "balanced_accuracy":  # mean recall over the classes in y (sklearn drops the others)
            recall = np.where(true_n > 0, hits / true_n, np.nan)
            return np.nanmean(recall, axis=1)
        if metric == "f1":  # macro over the classes in y or the predictions; 2TP / (2TP + FP + FN)
            labelled = (true_n > 0) | (pred_n > 0)
            f1 = np.where(labelled, 2 * hits / (true_n + pred_n), np.nan)
            return np.nanmean(f1, axis=1)
    raise ValueError(f"unknown metric {metric!r}; metrics: {', '.join(_CLASSIFICATION_METRICS)}")


def bootstrap_classification(y: np.ndarray, proba: np.ndarray, groups: np.ndarray, metrics: tuple[str, ...],
                             n: int, seed: int) -> dict[str, tuple[float, float]]:
    """95% percentile interval of every metric of ``classification`` named in ``metrics`` ("auc", "accuracy",
    "balanced_accuracy", "f1") over ``n`` patient resamples (``patient_resamples(groups, n, seed)``; the same
    resamples for every metric). AUC skips the resamples holding one class only; (nan, nan) when none is left."""
    y, proba = np.asarray(y), np.asarray(proba)
    if not (len(y) == len(proba) == len(groups)):
        raise ValueError("y, proba and groups must have one row per slide")
    unknown = [m for m in metrics if m not in _CLASSIFICATION_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; metrics: {', '.join(_CLASSIFICATION_METRICS)}")
    counts = _row_counts(groups, n, seed)
    return {m: _interval(_weighted_classification(counts, y, proba, m)) for m in metrics}


def _gene_resample_values(counts: np.ndarray, fc_true: np.ndarray, fc_pred: np.ndarray, cls_true: np.ndarray,
                          cls_proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(resamples, genes) AUC and Pearson, NaN where ``per_gene`` would give NaN on that resample."""
    n_genes = fc_true.shape[1]
    auc = np.full((len(counts), n_genes), np.nan)
    r = np.full((len(counts), n_genes), np.nan)
    for g in range(n_genes):
        known = ~np.isnan(fc_true[:, g])
        if known.any():
            r[:, g] = _weighted_pearson(counts[:, known], fc_true[known, g], fc_pred[known, g])
        used = (cls_true[:, g] >= 0) & np.isfinite(cls_proba[:, g]).all(axis=1)
        if used.any() and len(np.unique(cls_true[used, g])) > 1:
            auc[:, g] = _weighted_auc(counts[:, used], cls_true[used, g], cls_proba[used, g])
    return auc, r


def bootstrap_genes(fc_true: np.ndarray, fc_pred: np.ndarray, cls_true: np.ndarray, cls_proba: np.ndarray,
                    groups: np.ndarray, n: int, seed: int, summary: np.ndarray | None = None) -> dict:
    """Patient-bootstrap 95% intervals of the DE metrics of ``per_gene``: per gene AUC and Pearson, and their
    means over the genes of the boolean mask ``summary`` (default all), each resample averaging the genes whose
    value is defined in it (as the point estimate does; a resample with none is skipped).

    fc_true, fc_pred: (slides, genes) log2FC, NaN where unknown; cls_true: (slides, genes) class ids, -1 where not
    classified; cls_proba: (slides, genes, classes), NaN rows where the head has no classifier."""
    fc_true = np.asarray(fc_true, dtype=np.float64)
    fc_pred = np.asarray(fc_pred, dtype=np.float64)
    cls_true, cls_proba = np.asarray(cls_true), np.asarray(cls_proba, dtype=np.float64)
    n_slides, n_genes = fc_true.shape
    if fc_pred.shape != fc_true.shape or cls_true.shape != fc_true.shape or cls_proba.shape[:2] != fc_true.shape \
            or len(groups) != n_slides:
        raise ValueError("fc_true, fc_pred, cls_true, cls_proba and groups must agree on slides and genes")
    summary = np.ones(n_genes, dtype=bool) if summary is None else np.asarray(summary, dtype=bool)
    if summary.shape != (n_genes,):
        raise ValueError("summary: one boolean per gene")
    counts = _row_counts(groups, n, seed)
    auc, r = _gene_resample_values(counts, fc_true, fc_pred, cls_true, cls_proba)
    genes = []
    for g in range(n_genes):
        (a_lo, a_hi), (r_lo, r_hi) = _interval(auc[:, g]), _interval(r[:, g])
        genes.append({"auc_ci_low": a_lo, "auc_ci_high": a_hi, "pearson_ci_low": r_lo, "pearson_ci_high": r_hi})

    def mean_over_summary(values: np.ndarray) -> np.ndarray:
        chosen = values[:, summary]
        defined = ~np.isnan(chosen)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(defined, chosen, 0.0).sum(axis=1) / defined.sum(axis=1)

    return {"genes": genes, "mean_gene_auc_ci": _interval(mean_over_summary(auc)),
            "mean_gene_pearson_ci": _interval(mean_over_summary(r))}
