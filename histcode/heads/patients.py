"""Patients, not only slides: one prediction per patient from the predictions of its slides, or from one bag of
all their tiles.

A patient with several slides (a tumour block and its matched normal, several tumour blocks, a re-scan) gets,
per task, one prediction from the slides the task is about:

- ``tumor``: every slide of the patient; the patient has tumour when any slide has (pooled by the maximum of
  ``p_tumor``, as CLAM's ``patient_voting='max'``), whatever the pooling asked for;
- ``subtype``, ``de`` and ``survival``: the patient's tumour slides (called tumour, ``p_tumor >= 0.5``; all its
  slides when none is), since a subtype, a tumour-vs-normal fold change or a tumour's risk describe the tumour.

How the slides are pooled (``predict.patient_pooling``):

- ``mean``: the mean of the slides' outputs (class probabilities, predicted log2FC, log-risk); the class call
  is the class of highest mean probability, a DE call the commonest of the slides' calls (ties: the call of the
  slide with the highest ``p_tumor``);
- ``max``: the maximum of each output (a class head's call is then the class of highest maximum);
- ``bag``: every tile of the pooled slides as one bag through the registered head (so an attention head weighs
  the patient's tiles together, as CLAM's case-level bags); computed where the bags are (``histcode predict``),
  and the same as ``mean`` for out-of-fold rows, whose fold models are not kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

import numpy as np

from histcode.heads.outputs import NOT_APPLICABLE, TUMOUR_CALL_AT, Output

Pooling = Literal["mean", "max", "bag"]
POOLINGS: tuple[str, ...] = ("mean", "max", "bag")
TUMOUR_TASKS = ("subtype", "de", "survival")  # tasks about the tumour: pooled over the patient's tumour slides


def tumour_slides(p_tumor: dict[str, float | None]) -> list[str]:
    """The slides called tumour among ``p_tumor`` (slide -> probability); all of them when none is."""
    called = [s for s, p in p_tumor.items() if p is not None and np.isfinite(p) and p >= TUMOUR_CALL_AT]
    return sorted(called) if called else sorted(p_tumor)


def slides_for_task(task: str, slides: Sequence[str], p_tumor: dict[str, float | None]) -> list[str]:
    """Which of a patient's ``slides`` a ``task``'s patient-level prediction pools."""
    if task in TUMOUR_TASKS:
        known = {s: p_tumor.get(s) for s in slides}
        return tumour_slides(known)
    return sorted(slides)


def _class_call(outputs: dict[str, float]) -> str | None:
    """The class of the highest pooled probability among ``p_<class>`` outputs (lower-case class names)."""
    if not outputs:
        return None
    name = max(sorted(outputs), key=lambda n: outputs[n])
    return name.removeprefix("p_")


def pool_outputs(task: str, per_slide: dict[str, list[Output]], pooling: Pooling,
                 p_tumor: dict[str, float | None] | None = None) -> list[Output]:
    """One patient's outputs for ``task`` from its pooled slides' outputs (slide -> outputs, all of one head
    version). ``pooling`` ``bag`` pools like ``mean`` here (see the module's docstring). The call of a class task
    is recomputed from the pooled probabilities; the tumour task is always pooled by the maximum."""
    if not per_slide:
        return []
    how = "max" if task == "tumor" else ("mean" if pooling == "bag" else pooling)
    names = list(dict.fromkeys(o.name for outs in per_slide.values() for o in outs))
    pooled: dict[str, float | None] = {}
    calls: dict[str, list[tuple[str, str | None]]] = {}
    for name in names:
        values = [o.value for outs in per_slide.values() for o in outs if o.name == name]
        finite = [float(v) for v in values if v is not None and np.isfinite(v)]
        pooled[name] = (max(finite) if how == "max" else float(np.mean(finite))) if finite else None
        calls[name] = [(s, o.call) for s, outs in per_slide.items() for o in outs if o.name == name]
    if task == "tumor":
        p = pooled.get("p_tumor")
        call = None if p is None else ("tumor" if p >= TUMOUR_CALL_AT else "normal")
        return [Output("p_tumor", p, call)]
    if task == "de":
        order = sorted(per_slide, key=lambda s: -((p_tumor or {}).get(s) or 0.0))
        out = []
        for name in names:
            votes = [c for _, c in sorted(calls[name], key=lambda sc: order.index(sc[0])) if c is not None]
            applicable = [c for c in votes if c != NOT_APPLICABLE] or votes
            out.append(Output(name, pooled[name], _commonest(applicable)))
        return out
    probabilities = {n: v for n, v in pooled.items() if n.startswith("p_") and v is not None}
    call = _class_call(probabilities)
    if task == "survival":
        return [Output(n, pooled[n], _commonest([c for _, c in calls[n] if c is not None])) for n in names]
    # a class head's call is its class name as the head spells it: take it from a slide that made that call
    spelled = {c.lower(): c for outs in per_slide.values() for o in outs for c in [o.call] if c}
    call = spelled.get(call, call) if call else None
    return [Output(n, pooled[n], call) for n in names]


def _commonest(calls: list[str]) -> str | None:
    """The commonest call; ties go to the first of them in ``calls`` order."""
    if not calls:
        return None
    counts = Counter(calls)
    top = max(counts.values())
    return next(c for c in calls if counts[c] == top)


def merged_bag_arrays(features: Sequence[np.ndarray]) -> np.ndarray:
    """The tiles of several slides as one bag (rows concatenated; each slide's tiles in order)."""
    arrays = [np.asarray(f, dtype=np.float32) for f in features if len(f)]
    if not arrays:
        raise ValueError("no tiles to pool: every slide's bag is empty")
    return np.concatenate(arrays, axis=0)
