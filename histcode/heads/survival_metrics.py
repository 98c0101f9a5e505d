"""Metrics of survival predictions: Harrell's C-index (with patient-bootstrap intervals), the cumulative/dynamic
time-dependent AUC with inverse-probability-of-censoring weights (Uno et al. 2007; scikit-survival's
``cumulative_dynamic_auc``), Kaplan-Meier curves and the log-rank test.

Conventions, as the definitions have them:

- ``risk`` is a predicted log-risk: higher means an earlier expected event.
- Harrell's C: a pair (i, j) is comparable when the earlier time is an event (``T_i < T_j`` and ``E_i = 1``);
  it is concordant when ``risk_i > risk_j`` and counts 1/2 when the risks tie. Pairs whose times tie are not
  comparable (neither ordering is known from the data), nor are pairs whose earlier time is censored.
- Time-dependent AUC at horizon t: cases are the patients with an event by t (``T_i <= t``, ``E_i = 1``), each
  weighted by ``1 / G(T_i)``, G the Kaplan-Meier estimate of the censoring distribution (censorings as events,
  events as censorings; right-continuous at ``T_i``); controls the patients still event-free after t
  (``T_j > t``), weight 1; AUC(t) = sum_ij w_i [risk_i > risk_j] (ties 1/2) / (sum_i w_i * n_controls).
- Kaplan-Meier: S(t) = prod over event times u <= t of (1 - d_u / n_u), n_u those still at risk at u
  (time >= u), d_u the events at u (censorings at u stay in the risk set of u).
- Log-rank (two groups): at every distinct event time, O - E of group 1 and the hypergeometric variance
  n1 n2 d (n - d) / (n^2 (n - 1)); chi-square = (sum O - E)^2 / sum V on one degree of freedom.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from histcode.heads.metrics import _interval, _row_counts


def _check(time, event, risk=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event, dtype=np.float64)
    if time.ndim != 1 or event.shape != time.shape:
        raise ValueError("time and event: one value per patient")
    if not np.isin(event, (0.0, 1.0)).all():
        raise ValueError("event: 0 (censored) or 1 (event) per patient")
    if (~np.isfinite(time)).any() or (time < 0).any():
        raise ValueError("time: finite and >= 0 per patient")
    if risk is None:
        return time, event.astype(bool), None
    risk = np.asarray(risk, dtype=np.float64)
    if risk.shape != time.shape:
        raise ValueError("risk: one value per patient")
    return time, event.astype(bool), risk


def _pair_matrices(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(comparable (n, n): row i earlier and an event; concordance credit (n, n): 1, 1/2 on tied risks, 0)."""
    comparable = event[:, None] & (time[:, None] < time[None, :])
    credit = (risk[:, None] > risk[None, :]) + 0.5 * (risk[:, None] == risk[None, :])
    return comparable.astype(np.float64), credit * comparable


def c_index(time, event, risk) -> float:
    """Harrell's concordance index (NaN without a comparable pair)."""
    time, event, risk = _check(time, event, risk)
    comparable, concordant = _pair_matrices(time, event, risk)
    total = comparable.sum()
    return float(concordant.sum() / total) if total else float("nan")


def bootstrap_c_index(time, event, risk, groups, n: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the C-index over ``n`` patient resamples (``metrics.patient_resamples``' draws,
    one row per patient or several rows of one patient drawn together). A drawn pair of two copies of one row
    has tied times and is never comparable, so each resample's C is exactly that of its expanded rows; it is
    computed from row multiplicities w as (w^T A w) / (w^T C w), A concordance credit and C comparability."""
    time, event, risk = _check(time, event, risk)
    comparable, concordant = _pair_matrices(time, event, risk)
    counts = _row_counts(np.asarray(groups), n, seed)
    num = ((counts @ concordant) * counts).sum(axis=1)
    den = ((counts @ comparable) * counts).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(den > 0, num / den, np.nan)
    return _interval(values)


@dataclass(frozen=True)
class KaplanMeier:
    """A Kaplan-Meier estimate: the distinct event (or, for the censoring distribution, censoring) times, those at
    risk and with the event at each, and the survival just after each."""

    times: np.ndarray
    at_risk: np.ndarray
    events: np.ndarray
    survival: np.ndarray

    def at(self, t) -> np.ndarray:
        """S(t), right-continuous: the product over the estimate's times u <= t (1 before the first)."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        idx = np.searchsorted(self.times, t, side="right") - 1
        return np.where(idx >= 0, self.survival[np.maximum(idx, 0)], 1.0)


def kaplan_meier(time, event, censoring: bool = False) -> KaplanMeier:
    """The Kaplan-Meier estimate of the survival function, or (``censoring``) of the censoring distribution G,
    in which a censoring is the event and an event is censored (the same estimator on the flipped indicator)."""
    time, event, _ = _check(time, event)
    happens = ~event if censoring else event
    times = np.unique(time[happens])
    at_risk = np.array([(time >= u).sum() for u in times], dtype=np.float64)
    events = np.array([((time == u) & happens).sum() for u in times], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        factors = np.where(at_risk > 0, 1.0 - events / at_risk, 1.0)
    return KaplanMeier(times, at_risk, events, np.cumprod(factors))


def cumulative_dynamic_auc(time, event, risk, horizons, train_time=None, train_event=None) -> dict[float, float]:
    """Horizon -> the cumulative/dynamic AUC of ``risk`` (NaN where the horizon has no case or no control). The
    censoring distribution G is estimated on ``train_time``/``train_event`` (default: the scored patients)."""
    time, event, risk = _check(time, event, risk)
    g = kaplan_meier(time if train_time is None else train_time, event if train_event is None else train_event,
                     censoring=True)
    g_at = g.at(time)
    out = {}
    for t in np.atleast_1d(np.asarray(horizons, dtype=np.float64)):
        cases = event & (time <= t) & (g_at > 0)
        controls = time > t
        if not cases.any() or not controls.any():
            out[float(t)] = float("nan")
            continue
        w = 1.0 / g_at[cases]
        diff = risk[cases][:, None] - risk[controls][None, :]
        credit = ((diff > 0) + 0.5 * (diff == 0)).sum(axis=1)
        out[float(t)] = float((w * credit).sum() / (w.sum() * controls.sum()))
    return out


@dataclass(frozen=True)
class LogRank:
    chi2: float
    p: float
    observed: float  # events of group 1
    expected: float  # expected events of group 1 under no difference


def logrank(time, event, group) -> LogRank:
    """The two-group log-rank test (``group`` boolean or 0/1: group 1 is True); NaN where a group is empty or
    there is no event."""
    time, event, _ = _check(time, event)
    g = np.asarray(group).astype(bool)
    if g.shape != time.shape:
        raise ValueError("group: one value per patient")
    if not g.any() or g.all() or not event.any():
        return LogRank(float("nan"), float("nan"), float(event[g].sum()), float("nan"))
    o_minus_e = variance = expected = 0.0
    for u in np.unique(time[event]):
        at_risk = time >= u
        n, n1 = at_risk.sum(), (at_risk & g).sum()
        d, d1 = (event & (time == u)).sum(), (event & (time == u) & g).sum()
        e1 = d * n1 / n
        expected += e1
        o_minus_e += d1 - e1
        if n > 1:
            variance += n1 * (n - n1) * d * (n - d) / (n * n * (n - 1))
    chi2 = o_minus_e ** 2 / variance if variance > 0 else float("nan")
    return LogRank(float(chi2), float(stats.chi2.sf(chi2, 1)) if np.isfinite(chi2) else float("nan"),
                   float(event[g].sum()), float(expected))


def cox_partial_nll(time, event, risk) -> float:
    """The Cox negative log partial likelihood with Breslow's ties, averaged over the events: -(1/D) sum over
    events i of (risk_i - log sum_{j: T_j >= T_i} exp(risk_j)); NaN without an event."""
    time, event, risk = _check(time, event, risk)
    if not event.any():
        return float("nan")
    at_risk = time[None, :] >= time[event][:, None]
    shifted = np.where(at_risk, risk[None, :], -np.inf)
    top = shifted.max(axis=1)
    log_sum = top + np.log(np.exp(shifted - top[:, None]).sum(axis=1))
    return float(-(risk[event] - log_sum).mean())
