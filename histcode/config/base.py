"""Shared pieces of the configuration: unit types, the frozen section base, and the stable hash of a payload."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

MicronsPerPixel = Annotated[float, Field(gt=0, description="micrometres per pixel")]
Microns = Annotated[float, Field(gt=0, description="micrometres")]
SquareMicrons = Annotated[float, Field(ge=0, description="square micrometres")]
Pixels = Annotated[int, Field(gt=0, description="pixels")]
Fraction = Annotated[float, Field(ge=0, le=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def stable_hash(payload: object, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable payload with sorted keys (identical input -> identical id)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
