"""Choosing among aggregators without reading a test fold.

The choice is a procedure, and it is scored like a model: in each outer fold, every aggregator's model was
fitted on the training folds with the same inner patient splits; the one whose model scores best on the
selection split, which no head fitted or stopped early on (the task's selection score: AUC, or the mean AUC of
the signal genes; ties and undefined scores broken by the loss on that split, then by the order of
``heads.aggregators``), predicts that fold's test slides. Those pooled out-of-fold predictions are the procedure's score: the number reported for
``@best``, free of the optimism of picking the best pooled test score. The final choice applies the same rule
to the final models' selection split (``choose``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from histcode.config import HeadsConfig
from histcode.heads.cv import CVResult, pool

BEST = "best"


def rank_key(val_score: float, val_loss: float, order: int) -> tuple[float, float, int]:
    """Sort key, smallest first: higher validation score, then lower validation loss, then earlier in the
    configured order (NaN scores and losses rank last)."""
    score = -val_score if val_score is not None and math.isfinite(val_score) else math.inf
    loss = val_loss if val_loss is not None and math.isfinite(val_loss) else math.inf
    return score, loss, order


def choose(candidates: dict[str, dict], order: Sequence[str]) -> str:
    """The aggregator whose validation (``{"val_score", "val_loss"}``) ranks first."""
    position = {a: i for i, a in enumerate(order)}
    return min(candidates, key=lambda a: rank_key(candidates[a].get("val_score", math.nan),
                                                  candidates[a].get("val_loss", math.nan), position.get(a, len(order))))


def select_per_fold(results: Sequence[CVResult], cfg: HeadsConfig,
                    strict_folds: frozenset[int] = frozenset()) -> CVResult:
    """The procedure's cross-validation: per outer fold the aggregator ``choose`` picks from its validation
    split, its test predictions pooled over the folds. Every result must be of the same task and folds."""
    if not results:
        raise ValueError("no aggregator results to select from")
    task = results[0].task
    order = [r.aggregator for r in results]
    by_fold = {r.aggregator: {int(f["fold"]): (f, s) for f, s in zip(r.fold_metrics, r.fold_slides)} for r in results}
    folds = sorted(set.intersection(*(set(v) for v in by_fold.values())))
    best = CVResult(task, BEST)
    for k in folds:
        chosen = choose({a: by_fold[a][k][0] for a in order}, order)
        metrics, slides = by_fold[chosen][k]
        source = next(r for r in results if r.aggregator == chosen)
        test_idx = np.flatnonzero(np.isin(task.slide_ids, slides["test"]))
        for sid in slides["test"]:
            if sid in source.outputs:
                best.outputs[sid] = source.outputs[sid]
            if sid in source.attention:
                best.attention[sid] = source.attention[sid]
        outputs = [best.outputs.get(s) for s in task.slide_ids]
        fold = {"fold": k, "aggregator": chosen, "n_test": len(test_idx),
                **{f"val_{a}": by_fold[a][k][0].get("val_score", math.nan) for a in order},
                **task.kind.score(task, test_idx, outputs)}
        best.fold_metrics.append(fold)
        best.fold_slides.append(slides)
    return pool(best, cfg, strict_folds)


def chosen_counts(result: CVResult) -> dict[str, int]:
    """How many outer folds chose each aggregator."""
    counts: dict[str, int] = {}
    for fold in result.fold_metrics:
        counts[fold["aggregator"]] = counts.get(fold["aggregator"], 0) + 1
    return counts
