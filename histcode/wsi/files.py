"""Slide files on disk: a cheap change signature (size, mtime) and a content hash for formats without
OpenSlide's quickhash."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_signature(path: Path) -> tuple[int, float] | None:
    """(size, mtime) of a file, or None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime
