"""A head's output on one slide as named outputs: what `histcode predict` writes in its CSV, what the catalog's
``predictions`` table stores and what the viewer shows, for the registered heads and for the cross-validation's
fold models alike.

Each output is ``(name, value, call)``: the tumour head gives ``p_tumor``; the subtype head ``p_<class>`` for each
class (lower case); the DE head ``de_<gene>`` per gene, whose value is the predicted log2FC and whose call is the
class with the highest probability (``up``/``down``/``unchanged``), ``not_classified`` for a gene the label gate
left out of classification, or ``not_applicable`` on a slide the tumour head calls normal (a tumour-vs-normal fold
change means nothing there); the survival head ``risk``, whose value is the predicted log-risk and whose call is
``high`` or ``low`` against the median log-risk of the bags it was trained on. A class head's call is the class
with the highest probability, repeated on each of its outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

NOT_APPLICABLE = "not_applicable"
NOT_CLASSIFIED = "not_classified"
TUMOUR_CALL_AT = 0.5  # p_tumor at or above which the DE calls apply


class Output(NamedTuple):
    name: str
    value: float | None
    call: str | None


def class_outputs(task: str, classes: Sequence[str], proba: np.ndarray) -> list[Output]:
    """A class head's outputs from its class probabilities (in ``classes`` order)."""
    proba = np.asarray(proba, dtype=float)
    call = str(classes[int(np.argmax(proba))])
    if task == "tumor":
        return [Output("p_tumor", float(proba[list(classes).index("tumor")]), call)]
    return [Output(f"p_{c.lower()}", float(p), call) for c, p in zip(classes, proba)]


def de_outputs(genes: Sequence[str], classes: Sequence[str], classified: Sequence[str], out: np.ndarray,
               p_tumor: float | None = None) -> list[Output]:
    """The DE head's outputs from its (genes, 1 + classes) output: log2FC, then each class's probability.
    ``p_tumor``: the tumour head's probability on the same slide (None: the slide is known to be a tumour)."""
    out = np.asarray(out, dtype=float)
    rows = []
    for g, gene in enumerate(genes):
        probs = out[g, 1:]
        if p_tumor is not None and p_tumor < TUMOUR_CALL_AT:
            call = NOT_APPLICABLE
        elif gene in classified and np.isfinite(probs).all():
            call = str(classes[int(np.argmax(probs))])
        else:
            call = NOT_CLASSIFIED
        value = float(out[g, 0])
        rows.append(Output(f"de_{gene}", value if np.isfinite(value) else None, call))
    return rows


def survival_outputs(out: np.ndarray) -> list[Output]:
    """The survival head's output ``[log-risk, its training median]`` as ``risk``: the log-risk, called ``high``
    at or above the median of the training bags' log-risks, else ``low``."""
    out = np.asarray(out, dtype=float)
    risk, median = float(out[0]), float(out[1])
    if not np.isfinite(risk):
        return [Output("risk", None, None)]
    return [Output("risk", risk, "high" if risk >= median else "low")]


def as_row(outputs: Sequence[Output]) -> dict:
    """One slide's outputs as a flat row: probabilities as numbers, DE outputs as their calls."""
    return {o.name: o.call if o.name.startswith("de_") else o.value for o in outputs}
