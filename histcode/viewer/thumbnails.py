"""Slide thumbnails cached on disk, so that a cohort page of a large cohort does not open every slide again.

A thumbnail is named by the slide's content hash and its size, so it is shared by every workspace and every copy
of one (the same pixels give the same picture), and a slide whose pixels change gets a new one. The cache lives
outside the workspace (``$HISTCODE_CACHE_DIR``, else ``$XDG_CACHE_HOME/histcode``, else ``~/.cache/histcode``), so a
read-only workspace can be viewed; files are written whole (a temporary file renamed into place). Where the cache
cannot be written, thumbnails are only kept in memory, and the log says so once.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "HISTCODE_CACHE_DIR"
SAFE_KEY = re.compile(r"^[A-Za-z0-9_.:-]{8,128}$")


def cache_root() -> Path:
    """Where HistCode keeps caches that belong to no workspace."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "histcode"


class ThumbnailCache:
    """JPEG thumbnails on disk under ``root / thumbnails``, keyed by content hash and side."""

    def __init__(self, root: Path | None = None) -> None:
        self.dir = (root or cache_root()) / "thumbnails"
        self._writable = True

    def path(self, content_hash: str, side: int) -> Path | None:
        """The file of one thumbnail (None for a hash that cannot name a file safely)."""
        key = content_hash.replace(":", "-")
        if not SAFE_KEY.match(key):
            return None
        return self.dir / key[:2] / f"{key}-{int(side)}.jpg"

    def get(self, content_hash: str | None, side: int, render: Callable[[], bytes]) -> bytes:
        """The cached JPEG, else ``render()``'s, stored for next time."""
        target = self.path(content_hash, side) if content_hash else None
        if target is not None and target.is_file():
            try:
                return target.read_bytes()
            except OSError as exc:
                log.debug("thumbnail cache %s unreadable: %s", target, exc)
        data = render()
        if target is not None and self._writable:
            self._store(target, data)
        return data

    def _store(self, target: Path, data: bytes) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".thumb-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            self._writable = False
            log.warning("thumbnails are kept in memory only: cannot write the cache %s (%s); set $%s to a writable "
                        "folder", self.dir, exc, CACHE_ENV)
