"""The paper's ablation: encoder (random init, SimCLR, MoCo, AdCo, and any other registered encoder by its alias,
such as a foundation encoder) x aggregator (mean, attention), every combination trained and cross-validated the
same way, as comparable runs of the MLflow experiment ``heads``
(params ``method`` and ``aggregator``: select them in the UI and press Compare). Versions are registered under
the ablation's own aliases, ``ablation-<method>-<aggregator>`` and ``ablation-<method>-best``; the production
aliases (``@best``, ``@attention``, ``@mean``, ``@max``) that `histcode predict` reads are never moved here."""

from __future__ import annotations

import logging

from histcode.apps.encoders import alias_of
from histcode.config import HistcodeConfig
from histcode.features.embed import materialize
from histcode.apps.train_heads import HeadsReport, train_heads
from histcode.ssl.pretrain import completed, pretrain, register_random_encoder
from histcode.tracking import Tracker
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

METHODS = ("random", "simclr", "moco", "adco")
AGGREGATORS = ("mean", "attention", "guided")  # the grid's default aggregators


class AblationError(ValueError):
    """An encoder of the grid that cannot be found or trained; the message says what to do."""


def _encoder_version(ws: Workspace, cfg: HistcodeConfig, method: str) -> str:
    """The registered encoder of ``method``, trained (or registered, for random) if there is none yet."""
    name = cfg.pretrain.register_as
    if method not in METHODS:  # another registered encoder, by its alias (`histcode encoders register` sets one)
        try:
            return str(Tracker(ws).client.get_model_version_by_alias(name, alias_of(method)).version)
        except Exception as exc:  # noqa: BLE001 -- MLflow's own error for an unknown alias
            raise AblationError(f"ablation encoder {method!r} is neither one of {', '.join(METHODS)} nor an alias of "
                                f"{name} (register it first: `histcode encoders register NAME --weights PATH`)") from exc
    if method == "random":
        try:
            return Tracker(ws).client.get_model_version_by_alias(name, "random").version
        except Exception:  # noqa: BLE001 -- not registered yet
            return register_random_encoder(ws, cfg)
    mcfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"method": method})})
    done = completed(ws, mcfg)
    if done is not None:
        return str(done["version"])
    return str(pretrain(ws, mcfg).version)


def run_ablation(ws: Workspace, cfg: HistcodeConfig, methods: tuple[str, ...] = METHODS,
                 aggregators: tuple[str, ...] = AGGREGATORS, tasks: tuple[str, ...] | None = None) -> list[HeadsReport]:
    reports = []
    for method in methods:
        version = _encoder_version(ws, cfg, method)
        view = materialize(ws, cfg, encoder=f"{cfg.pretrain.register_as}/{version}").view
        log.info("ablation: %s encoder v%s -> view %s", method, version, view.view_id)
        reports.append(train_heads(ws, cfg, tasks, aggregators, view.view_id, ablation=alias_of(method)))
    return reports
