"""Typed configuration, one pydantic model per stage, combined in one root read from params.yaml.

Every section forbids unknown keys so a typo in params.yaml is an error, not a silently ignored knob.
Units are part of the type names: ``MicronsPerPixel``, ``Pixels``, ``SquareMicrons``.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from histcode.config.base import Fraction, Microns, MicronsPerPixel, Pixels, SquareMicrons, _Section, stable_hash
from histcode.config.pretrain import AugmentConfig, PretrainConfig, ProbeConfig, StainNormConfig
from histcode.config.slides import (
    CohortsConfig,
    DemoConfig,
    IngestConfig,
    TileQCConfig,
    TilingConfig,
    TissueMaskConfig,
)
from histcode.config.stages import (
    DEFAULT_PANEL,
    FeaturesConfig,
    GdcLabelsSource,
    HeadsConfig,
    LabelsConfig,
    OODConfig,
    PredictConfig,
)
from histcode.errors import HistcodeError

__all__ = [
    "DEFAULT_PANEL", "AugmentConfig", "CohortsConfig", "ConfigError", "DemoConfig", "FeaturesConfig", "Fraction",
    "GdcLabelsSource", "HeadsConfig", "HistcodeConfig", "IngestConfig", "LabelsConfig", "Microns", "MicronsPerPixel",
    "OODConfig", "Pixels", "PredictConfig", "PretrainConfig", "ProbeConfig", "SquareMicrons", "StainNormConfig",
    "TileQCConfig", "TilingConfig", "TissueMaskConfig", "WorkspaceConfig", "load_config", "stable_hash",
]


class WorkspaceConfig(_Section):
    """``private``: every file and folder HistCode creates in the workspace is owner-only (umask 077, set by the
    `histcode` command before it writes; ``$HISTCODE_PRIVATE=1`` does the same for a whole lab). Off by default
    (files readable by the group and others, as the umask of the shell gives them)."""

    private: bool = False


class HistcodeConfig(_Section):
    workspace: WorkspaceConfig = WorkspaceConfig()
    demo: DemoConfig = DemoConfig()
    cohorts: CohortsConfig = CohortsConfig()
    ingest: IngestConfig = IngestConfig()
    tiling: TilingConfig = TilingConfig()
    pretrain: PretrainConfig = PretrainConfig()
    features: FeaturesConfig = FeaturesConfig()
    labels: LabelsConfig = LabelsConfig()
    heads: HeadsConfig = HeadsConfig()
    predict: PredictConfig = PredictConfig()


class ConfigError(HistcodeError, ValueError):
    """params.yaml is missing a section's shape, has unknown keys or bad values."""


def load_config(path: Path | None) -> HistcodeConfig:
    """Read params.yaml, or the defaults when ``path`` is None or does not exist. Raises ConfigError naming
    the file and the offending key."""
    if path is None or not Path(path).exists():
        return HistcodeConfig()
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return HistcodeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
