"""Plots of cross-validated heads (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def roc_curve_png(y: np.ndarray, score: np.ndarray, title: str, path: Path) -> Path:
    from sklearn.metrics import auc, roc_curve

    fpr, tpr, _ = roc_curve(y, score)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUC {auc(fpr, tpr):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    return _save(fig, path)


def confusion_png(y: np.ndarray, pred: np.ndarray, classes: tuple[str, ...], title: str, path: Path) -> Path:
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def fold_change_vs_auc_png(rows: list[dict], title: str, path: Path) -> Path:
    """Per gene: mean |log2FC| against AUC (the paper: larger fold changes are predicted better)."""
    fig, ax = plt.subplots(figsize=(5, 4))
    pts = [(r["mean_abs_log2fc"], r["auc"], r["gene"]) for r in rows if not np.isnan(r["auc"])]
    if pts:
        x, y, names = zip(*pts)
        ax.scatter(x, y)
        for xi, yi, n in pts:
            ax.annotate(n, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="mean |log2 fold change|", ylabel="AUC of DE class", title=title)
    return _save(fig, path)


def kaplan_meier_png(curves: dict[str, dict], title: str, path: Path, note: str = "") -> Path:
    """Kaplan-Meier curves as steps, censorings as ticks: ``curves`` maps a label (e.g. ``high risk (n=11)``) to
    ``times`` and ``survival`` (the steps, from time 0 at 1.0) and ``censored`` / ``censored_survival`` (where the
    ticks go); ``note`` (e.g. the log-rank p) is written in a corner."""
    fig, ax = plt.subplots(figsize=(5, 3.8))
    colours = {"high": "#c0392b", "low": "#2471a3"}
    for label, c in curves.items():
        colour = next((v for k, v in colours.items() if label.startswith(k)), None)
        line, = ax.step(c["times"], c["survival"], where="post", label=label, color=colour)
        if len(c["censored"]):
            ax.plot(c["censored"], c["censored_survival"], "|", color=line.get_color(), markersize=8)
    ax.set(xlabel="days", ylabel="survival probability", ylim=(0, 1.05), title=title)
    if note:
        ax.text(0.98, 0.95, note, transform=ax.transAxes, ha="right", va="top", fontsize=8)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
