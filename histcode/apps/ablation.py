"""The paper's ablation: encoder (random init, colour statistics, SimCLR, MoCo, AdCo, and any other registered
encoder by its alias, such as a foundation encoder) x aggregator (mean, attention, guided), every combination
trained and cross-validated the same way, as comparable runs of the MLflow experiment ``heads`` (params
``method`` and ``aggregator``: select them in the UI and press Compare). Versions are registered under the
ablation's own aliases, ``ablation-<method>-<aggregator>`` and ``ablation-<method>-best``; the production
aliases (``@best``, ``@attention``, ``@mean``, ``@max``) that `histcode predict` reads are never moved here.

Every row reads the slides' tiles the same way: the baselines are registered with the stain normalisation of
``pretrain.stain_norm``, as the encoders trained here are, and a grid whose encoders would read tiles
differently (a foundation encoder registered without ``--stain-norm``, an encoder trained under other settings)
is refused, naming each encoder's reading, before anything is embedded."""

from __future__ import annotations

import logging

from histcode.apps.encoders import alias_of
from histcode.config import HistcodeConfig
from histcode.errors import HistcodeError
from histcode.features.embed import materialize
from histcode.apps.train_heads import HeadsReport, train_heads
from histcode.ssl.pretrain import BASELINES, baseline_tags, completed, pretrain, register_baseline_encoder
from histcode.ssl.stain_norm import NONE, describe
from histcode.tracking import Tracker
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

TRAINED = ("simclr", "moco", "adco")
METHODS = ("random", "colour", *TRAINED)
AGGREGATORS = ("mean", "attention", "guided")  # the grid's default aggregators


class AblationError(HistcodeError, ValueError):
    """An encoder of the grid that cannot be found, trained or compared; the message says what to do."""


def _version_tags(tracker: Tracker, name: str, version: str) -> dict:
    return dict(tracker.client.get_model_version(name, version).tags or {})


def _baseline_version(ws: Workspace, cfg: HistcodeConfig, method: str) -> str:
    """The registered baseline of exactly these settings (architecture, seed, input size, stain normalisation),
    registered anew when the alias points at another (e.g. one from before the baselines read stained tiles)."""
    tracker, name = Tracker(ws), cfg.pretrain.register_as
    want = baseline_tags(cfg.pretrain, method)
    try:
        version = str(tracker.client.get_model_version_by_alias(name, method).version)
    except Exception:  # noqa: BLE001 -- not registered yet
        return register_baseline_encoder(ws, cfg, method)
    tags = _version_tags(tracker, name, version)
    if all(tags.get(k, NONE if k == "stain_norm" else None) == v for k, v in want.items()):
        return version
    log.info("%s@%s (version %s) was registered with other settings; registering the %s baseline again", name,
             method, version, method)
    return register_baseline_encoder(ws, cfg, method)


def _encoder_version(ws: Workspace, cfg: HistcodeConfig, method: str) -> str:
    """The registered encoder of ``method``, trained (or registered, for the baselines) if there is none yet."""
    name = cfg.pretrain.register_as
    if method in BASELINES:
        return _baseline_version(ws, cfg, method)
    if method not in TRAINED:  # another registered encoder, by its alias (`histcode encoders register` sets one)
        try:
            return str(Tracker(ws).client.get_model_version_by_alias(name, alias_of(method)).version)
        except Exception as exc:  # noqa: BLE001 -- MLflow's own error for an unknown alias
            raise AblationError(f"ablation encoder {method!r} is neither one of {', '.join(METHODS)} nor an alias of "
                                f"{name} (register it first: `histcode encoders register NAME --weights PATH`)") from exc
    mcfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"method": method})})
    done = completed(ws, mcfg)
    if done is not None:
        return str(done["version"])
    return str(pretrain(ws, mcfg).version)


def readings(tracker: Tracker, name: str, versions: dict[str, str]) -> dict[str, str]:
    """How each encoder version reads a slide's tiles: its ``stain_norm`` tag (``none`` when it has none)."""
    return {m: _version_tags(tracker, name, v).get("stain_norm") or NONE for m, v in versions.items()}


def check_same_reading(found: dict[str, str]) -> None:
    """Refuse a grid whose encoders read tiles differently: it would compare stain normalisation, not encoders."""
    if len(set(found.values())) > 1:
        listed = "; ".join(f"{m}: {r}" for m, r in found.items())
        raise AblationError("the ablation's encoders read tiles differently, so their rows would not compare the "
                            f"encoders alone ({listed}); register a foundation encoder with `--stain-norm` to match "
                            "pretrain.stain_norm, or set pretrain.stain_norm.method for the whole grid")


def run_ablation(ws: Workspace, cfg: HistcodeConfig, methods: tuple[str, ...] = METHODS,
                 aggregators: tuple[str, ...] = AGGREGATORS, tasks: tuple[str, ...] | None = None) -> list[HeadsReport]:
    name = cfg.pretrain.register_as
    pending = {m: None for m in methods}
    for method in methods:  # registered baselines and named encoders first: a refusal comes before any training
        if method not in TRAINED:
            pending[method] = _encoder_version(ws, cfg, method)
    known = {m: v for m, v in pending.items() if v is not None}
    trained = {m: describe(cfg.pretrain.stain_norm) for m in methods if m in TRAINED}  # the tag pretrain will give
    check_same_reading({**readings(Tracker(ws), name, known), **trained})
    reports = []
    for method in methods:
        version = pending[method] or _encoder_version(ws, cfg, method)
        view = materialize(ws, cfg, encoder=f"{name}/{version}").view
        log.info("ablation: %s encoder v%s -> view %s", method, version, view.view_id)
        reports.append(train_heads(ws, cfg, tasks, aggregators, view.view_id, ablation=alias_of(method)))
    return reports

