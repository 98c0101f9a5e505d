"""Small files the stores write beside their databases (stage reports, run records), written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, payload: dict) -> Path:
    """Write atomically (temporary file + rename) so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path
