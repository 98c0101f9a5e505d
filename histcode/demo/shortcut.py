"""The colour shortcut, measured: how well a tile's mean RGB alone tells tumour from benign.

A logistic regression on the three channel means (standardised), cross-validated with whole patients held
out (five folds, or one per patient when there are fewer), scored by ROC AUC of the held-out predictions. Run
on the tiles as photographed (LC25000's own colours) and as placed on the demo slides, it says how much of the
class the colour still gives away. Part of what remains is the tissue's own: tumour is denser and more
haematoxylin-rich than airy benign lung, in any stain.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def colour_shortcut_auc(mean_rgb: np.ndarray, tumour: np.ndarray, groups: np.ndarray) -> float:
    """Cross-validated AUC of tumour vs benign from ``mean_rgb`` (n, 3); ``groups`` (e.g. patients) never
    straddle a training and a test fold."""
    from sklearn.linear_model import LogisticRegression  # here: the demo's rerun never needs sklearn (1 s to import)
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, groups = np.asarray(mean_rgb, dtype=float), np.asarray(tumour, dtype=bool), np.asarray(groups)
    if x.ndim != 2 or x.shape[1] != 3 or len(x) != len(y) or len(y) != len(groups):
        raise ValueError(f"need mean_rgb (n, 3) with n labels and groups; got {x.shape}, {y.shape}, {groups.shape}")
    if y.all() or not y.any():
        raise ValueError("need tiles of both classes")
    folds = min(5, len(np.unique(groups)))
    if folds < 2:
        raise ValueError("need at least two groups to hold one out")
    scores = np.full(len(y), np.nan)
    for train, test in GroupKFold(folds).split(x, y, groups):
        if y[train].all() or not y[train].any():
            scores[test] = y[train].mean()
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[train], y[train])
        scores[test] = model.predict_proba(x[test])[:, 1]
    return float(roc_auc_score(y, scores))


def cohort_shortcut(provenance: pd.DataFrame, slides: pd.DataFrame, source_rgb: dict[str, tuple]) -> dict[str, float]:
    """The measure on a demo cohort's tissue cells: as photographed (``source_rgb`` by source file name) and as
    placed (provenance ``mean_r/g/b``), patients held out."""
    cells = provenance.merge(slides[["slide_id", "patient_id"]], on="slide_id")
    tumour = (cells.kind == "tumour").to_numpy()
    groups = cells.patient_id.to_numpy()
    placed = cells[["mean_r", "mean_g", "mean_b"]].to_numpy()
    photographed = np.array([source_rgb[name] for name in cells.source])
    return {"photographed": round(colour_shortcut_auc(photographed, tumour, groups), 3),
            "placed": round(colour_shortcut_auc(placed, tumour, groups), 3)}
