"""Strata of slide-level scores: tumour-vs-normal AUC by the tumour fraction of the tumour slides (small foci
apart from large regions), from the slide attribute ``tumour_fraction`` (a manifest column; the demo writes it)."""

from __future__ import annotations

import json

import numpy as np

from histcode.store.catalog import Catalog


def tumour_fractions(catalog: Catalog, slide_ids: list[str]) -> np.ndarray | None:
    """Each slide's ``tumour_fraction`` attribute (a manifest column; the demo writes it), NaN where unknown;
    None when no slide has one."""
    rows = {r["slide_id"]: r["attributes"] for r in catalog.query("SELECT slide_id, attributes FROM slides")}
    values = []
    for sid in slide_ids:
        attrs = json.loads(rows.get(sid) or "{}")
        try:
            values.append(float(attrs.get("tumour_fraction", "nan")))
        except (TypeError, ValueError):
            values.append(float("nan"))
    out = np.array(values, dtype=float)
    return out if np.isfinite(out).any() else None


def fraction_strata(y: np.ndarray, p_tumour: np.ndarray, fraction: np.ndarray, bins: tuple[float, ...]) -> dict:
    """Tumour-vs-normal AUC by tumour-fraction bin: the tumour slides whose tumour fraction lies in the bin
    against every normal slide (``auc_tf_<lo>_<hi>``, percent), with the bin's slide count (``n_tf_...``)."""
    from sklearn.metrics import roc_auc_score

    edges = [0.0, *bins, 1.0]
    normal = y == 0
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        name = f"tf_{round(lo * 100):02d}_{round(hi * 100):02d}"
        tumour = (y == 1) & (fraction >= lo) & ((fraction < hi) | (hi >= 1.0))
        out[f"n_{name}"] = float(tumour.sum())
        if tumour.any() and normal.any():
            keep = tumour | normal
            out[f"auc_{name}"] = float(roc_auc_score(y[keep], p_tumour[keep]))
    return out
