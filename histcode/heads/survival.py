"""The survival task: overall survival (or another endpoint) of each patient from its tumour slides.

Targets are (time, event) per tumour slide, its patient's survival label (``survival_labels``, written by
`histcode labels ingest` from a clinical table and checked by the label gate, which refuses the task when the
labelled patients hold fewer than ``labels.min_survival_events`` events). Two heads:

- ``attention``: gated-attention MIL (``SurvivalAttention``) giving one log-risk per slide, trained by the Cox
  partial likelihood with Breslow's ties over mini-batches of ``heads.survival.bags_per_step`` bags (a Cox loss
  needs a risk set of several patients; a batch without an event is skipped), early-stopped on the Cox loss of
  the stopping split as a whole;
- ``mean``: a linear Cox model on standardised mean-pooled vectors with a ridge penalty
  (``heads.survival.ridge``), fitted on the whole training fold at once.

Every fitted head keeps the median log-risk of its training bags (``WithRiskReference``): a slide's output is
``[log-risk, training median]`` and its call ``high`` (log-risk >= the median) or ``low``. Metrics are per
patient: a patient with several tumour slides has the mean of its slides' log-risks (a patient's slides are all
in one fold, so they share a training median). Harrell's C-index with a patient-bootstrap interval, the
time-dependent AUC at ``heads.survival.horizons_days`` (censoring weights from the scored patients), and the
log-rank test of the out-of-fold high vs low groups, whose Kaplan-Meier curves the heads log to MLflow.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import torch
from torch import nn

from histcode.config import HeadsConfig
from histcode.errors import HistcodeError
from histcode.heads import survival_metrics as sm
from histcode.heads.data import Bag
from histcode.heads.fit import fit_mean_cox
from histcode.heads.models import SurvivalAttention, WithRiskReference, cox_loss
from histcode.heads.task_kind import Schedule, TaskData, TaskKind, labels_and_folds
from histcode.store.catalog import Catalog

log = logging.getLogger(__name__)

HIGH, LOW = "high", "low"
SURVIVAL = "survival"


class SurvivalRefused(HistcodeError, ValueError):
    """The survival task cannot train on the current label set (no survival labels, or the label gate refused
    them); the message says why and what to run."""


def refusal(catalog: Catalog) -> str | None:
    """Why the current label set's gate refused the survival task, or None."""
    rows = catalog.query("SELECT refused_tasks FROM label_sets WHERE is_current")
    refused = json.loads(rows[0]["refused_tasks"] or "{}") if rows else {}
    return refused.get(SURVIVAL)


class SurvivalTask(TaskKind):
    name = SURVIVAL
    aggregators = ("attention", "mean")

    def load(self, catalog: Catalog, bags: dict[str, Bag]) -> TaskData:
        labels, folds = labels_and_folds(catalog, bags)
        reason = refusal(catalog)
        if reason:
            raise SurvivalRefused(f"survival: refused by the label gate: {reason}")
        survival = pd.DataFrame(catalog.query("SELECT patient_id, time, event FROM survival_labels"),
                                columns=["patient_id", "time", "event"])
        if survival.empty:
            raise SurvivalRefused("survival: no survival labels in the current label set: give `histcode labels "
                                  "ingest` a clinical table (--clinical FILE, or labels.clinical)")
        tumour = labels[labels.tumor == True]  # noqa: E712 -- a nullable column
        frame = tumour.merge(survival, on="patient_id", how="inner").sort_values("slide_id").reset_index(drop=True)
        if frame.empty:
            raise SurvivalRefused("survival: no tumour slide with vectors belongs to a patient with a survival label")
        y = frame[["time", "event"]].to_numpy(dtype=np.float64)
        return TaskData(self.name, frame.slide_id.tolist(), frame.patient_id.to_numpy(),
                        frame.slide_id.map(folds).to_numpy(), y)

    def targets(self, data: TaskData, idx: np.ndarray) -> list:
        return [(float(data.y[i, 0]), float(data.y[i, 1])) for i in idx]

    def strata(self, data: TaskData, idx: np.ndarray) -> np.ndarray:
        return data.y[idx, 1].astype(int)  # inner splits hold events in proportion

    def schedule(self, cfg: HeadsConfig) -> Schedule:
        s = cfg.survival
        return Schedule(s.epochs, s.min_epochs, s.patience, s.bags_per_step)

    def torch_model(self, aggregator: str, in_dim: int, shape: dict[str, int], cfg: HeadsConfig) -> nn.Module:
        if aggregator != "attention":
            raise ValueError("the survival task has attention and mean aggregators")
        return SurvivalAttention(in_dim)

    def loss(self, model: nn.Module, bag: torch.Tensor, target) -> torch.Tensor:
        return self.batch_loss(model, [(bag, target)])

    def batch_loss(self, model: nn.Module, pairs: list[tuple[torch.Tensor, object]]) -> torch.Tensor:
        """The Cox loss over the bags of ``pairs`` (one risk set); a tensor without a gradient (0) when none of
        them is an event, so the step is skipped."""
        time = torch.tensor([float(t[0]) for _, t in pairs])
        event = torch.tensor([float(t[1]) for _, t in pairs])
        if not bool((event > 0).any()):
            return torch.zeros(())
        risk = torch.cat([model(bag)[0].reshape(1) for bag, _ in pairs])
        return cox_loss(risk, time.to(risk.device), event.to(risk.device))

    def fit_linear(self, train: list[tuple[np.ndarray, object]], seed: int, cfg: HeadsConfig,
                   guide: nn.Module | None = None) -> nn.Module:
        return fit_mean_cox(train, cfg.survival.ridge, guide)

    def finalise(self, model: nn.Module, train_bags: list[np.ndarray]) -> nn.Module:
        model.eval()
        with torch.no_grad():
            risks = [float(model(torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)))[0].reshape(-1)[0])
                     for b in train_bags]
        return WithRiskReference(model, float(np.median(risks))).eval()

    def val_loss(self, data: TaskData, idx: np.ndarray, outputs: list) -> float:
        if len(idx) == 0:
            return float("nan")
        frame = patient_risks(data, idx, outputs)
        return sm.cox_partial_nll(frame.time, frame.event, frame.risk)

    def score(self, data: TaskData, idx: np.ndarray, outputs: list) -> dict[str, float]:
        if len(idx) == 0:
            return {}
        frame = patient_risks(data, idx, outputs)
        return {"c_index": sm.c_index(frame.time, frame.event, frame.risk), "n_patients": float(len(frame)),
                "n_events": float(frame.event.sum())}

    def summarise(self, result, data: TaskData, idx: np.ndarray, outputs: list, cfg: HeadsConfig) -> None:
        frame = patient_risks(data, idx, outputs)
        result.pooled.update(survival_summary(frame, cfg.survival.horizons_days, cfg.bootstrap, cfg.seed))
        result.patients = frame

    @staticmethod
    def selection_score(pooled: dict) -> float:
        return float(pooled.get("c_index", float("nan")))


def patient_risks(data: TaskData, idx: np.ndarray, outputs: list) -> pd.DataFrame:
    """One row per patient of the slides ``idx``: patient_id, fold, time, event, risk (the mean of its slides'
    log-risks), median (its fold models' training median), group (high: risk >= median, else low), n_slides."""
    rows = pd.DataFrame({"patient_id": data.patients[idx], "fold": data.folds[idx], "time": data.y[idx, 0],
                         "event": data.y[idx, 1], "risk": [float(outputs[i][0]) for i in idx],
                         "median": [float(outputs[i][1]) for i in idx]})
    out = rows.groupby("patient_id", sort=True).agg(fold=("fold", "first"), time=("time", "first"),
                                                     event=("event", "first"), risk=("risk", "mean"),
                                                     median=("median", "mean"), n_slides=("risk", "size"))
    out = out.reset_index()
    out["event"] = out.event.astype(int)
    out["group"] = np.where(out.risk >= out["median"], HIGH, LOW)
    return out


def survival_summary(frame: pd.DataFrame, horizons: tuple[float, ...], bootstrap: int, seed: int) -> dict[str, float]:
    """Pooled survival metrics of a ``patient_risks`` frame: the C-index and its patient-bootstrap interval, the
    time-dependent AUC at each horizon (``auc_<days>d``), the log-rank test of high vs low (``logrank_chi2``,
    ``logrank_p``) and the groups' sizes."""
    time, event, risk = frame.time.to_numpy(), frame.event.to_numpy(), frame.risk.to_numpy()
    out = {"c_index": sm.c_index(time, event, risk), "n_patients": float(len(frame)), "n_events": float(event.sum())}
    out["c_index_ci_low"], out["c_index_ci_high"] = sm.bootstrap_c_index(time, event, risk, frame.patient_id.to_numpy(),
                                                                         bootstrap, seed)
    for h, auc in sm.cumulative_dynamic_auc(time, event, risk, horizons).items():
        out[f"auc_{int(round(h))}d"] = auc
    high = (frame.group == HIGH).to_numpy()
    test = sm.logrank(time, event, high)
    out.update({"logrank_chi2": test.chi2, "logrank_p": test.p, "n_high": float(high.sum()),
                "n_low": float((~high).sum())})
    return out


def km_curves(frame: pd.DataFrame) -> dict[str, dict]:
    """Kaplan-Meier curves of the high and low groups of a ``patient_risks`` frame, as ``viz.plots`` draws them:
    label -> times and survival of the steps (from 0 at 1.0), censored times and the survival there."""
    out = {}
    for group in (HIGH, LOW):
        part = frame[frame.group == group]
        if part.empty:
            continue
        km = sm.kaplan_meier(part.time.to_numpy(), part.event.to_numpy())
        censored = part.time[part.event == 0].to_numpy(dtype=float)
        times, survival = np.r_[0.0, km.times], np.r_[1.0, km.survival]
        last = float(part.time.max())
        if last > times[-1]:  # the curve runs on, flat, to the group's last follow-up
            times, survival = np.r_[times, last], np.r_[survival, survival[-1]]
        out[f"{group} risk (n={len(part)})"] = {
            "times": times, "survival": survival, "censored": censored,
            "censored_survival": km.at(censored) if len(censored) else np.zeros(0)}
    return out


def km_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The curves of ``km_curves`` as one long table (group, time, survival) for `dvc plots`."""
    rows = [{"group": label.split(" ")[0], "time": float(t), "survival": round(float(v), 4)}
            for label, c in km_curves(frame).items() for t, v in zip(c["times"], c["survival"])]
    return pd.DataFrame(rows, columns=["group", "time", "survival"])
