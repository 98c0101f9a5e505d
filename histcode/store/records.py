"""Row types written to the catalog. Plain dataclasses: the library builds them, the catalog stores them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

OK = "ok"
FAILED = "failed"
INVALIDATED = "invalidated"

TRAINING, INFERENCE = "training", "inference"  # cohort roles


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class SlideRecord:
    slide_id: str
    path: str
    status: str
    reason: str | None = None
    patient_id: str | None = None
    content_hash: str | None = None
    hash_kind: str | None = None
    file_size: int | None = None
    file_mtime: float | None = None
    vendor: str | None = None
    width: int | None = None
    height: int | None = None
    level_count: int | None = None
    level_dimensions: list[list[int]] | None = None
    level_downsamples: list[float] | None = None
    storage_tile: list[int] | None = None
    mpp_x: float | None = None
    mpp_y: float | None = None
    mpp_source: str | None = None
    objective: float | None = None
    attributes: str | None = None  # JSON object of the manifest's extra columns (labels, sites, ...)
    cohort: str | None = None

    def as_row(self) -> dict:
        return asdict(self)


@dataclass
class TilingRecord:
    slide_id: str
    spec_id: str
    content_hash: str
    status: str
    reason: str | None = None
    n_candidates: int = 0
    n_tiles: int = 0
    n_rejected_tissue: int = 0
    n_rejected_qc: int = 0
    tile_size_l0: int | None = None
    read_level: int | None = None
    mask_threshold: float | None = None
    slide_tissue_fraction: float | None = None
    thumbnail_path: str | None = None
    mask_path: str | None = None
    seconds: float | None = None
    created_at: datetime = field(default_factory=utcnow)

    def as_row(self) -> dict:
        return asdict(self)


def is_path_attribute(key: str) -> bool:
    """Slide attributes that name files (``mask``, ``*_path``): resolved like the slide's path, and stored
    relative to the workspace when they lie inside it."""
    return key == "mask" or key.endswith("_path")
