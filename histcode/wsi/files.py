"""Slide files on disk: a cheap change signature (size, mtime) and a content hash for formats without
OpenSlide's quickhash.

A DICOM WSI slide is a folder of instances (one per pyramid level, label, overview), so both also take a folder:
its signature sums the sizes of the files in it and takes the newest mtime (adding, removing or rewriting an
instance changes it), its hash covers every file's name and bytes in name order.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    folder = path.is_dir()
    for f in _files_of(path) if folder else [path]:
        if folder:
            digest.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def file_signature(path: Path) -> tuple[int, float] | None:
    """(size, mtime) of a file, or of the files of a folder (total size, newest mtime); None if it cannot be
    stat'ed."""
    try:
        st = os.stat(path)
        if not path.is_dir():
            return st.st_size, st.st_mtime
        stats = [os.stat(f) for f in _files_of(path)]
    except OSError:
        return None
    return sum(s.st_size for s in stats), max((s.st_mtime for s in stats), default=st.st_mtime)
