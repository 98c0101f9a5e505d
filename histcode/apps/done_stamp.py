"""One cheap answer to "would the demo do any work?", checked before anything heavy is imported.

Every stage of the demo skips what is done, but asking each stage means importing torch, MLflow, LanceDB and
kornia and opening every store (about 9 s of a 4-minute demo on the 2-core machine). A complete demo run
therefore leaves a stamp (``outputs/.demo-done.json``) holding a fingerprint of everything its work depends on:

- the effective configuration (the workspace's params.yaml over the defaults, every section);
- the code: the content of every module of the ``histcode`` package, and the versions of the libraries that
  shape results (torch, torchvision, kornia, scikit-learn, lancedb, duckdb, mlflow, openslide);
- the workspace's state: the path, size and modification time of every file under ``data/`` (the demo cohort,
  the catalog, the vector store), ``mlruns/``, ``metrics/`` and ``outputs/`` (server logs, the catalog's backup
  and the stamp itself left out; symlinked folders followed), and of every input the config names wherever it lies (the demo cohort's
  folder, its source tiles, the expression matrix, the probe's tiles);
- where the stores are. A workspace whose vectors or runs live elsewhere (``HISTCODE_LANCEDB_URI``,
  ``HISTCODE_MLFLOW_URI``) is never stamped: their state cannot be seen from here, so every run asks the stages.

A rerun whose fingerprint equals the stamp's has nothing to do (the stores are exactly as the complete run left
them, so every stage would skip) and says so with the stored summary; any other run goes through the stages, and
a complete one writes the stamp anew. A command that writes to the workspace (``histcode pretrain``, ``heads``,
a Prefect run, ``dvc repro``) changes a file's size or time, so the next demo checks every stage again. Nothing
here imports more than the standard library.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

STAMP = ".demo-done.json"
STATE_DIRS = ("data", "mlruns", "metrics", "outputs")  # under the workspace root
# written by servers while nothing about the results changes; the catalog's backup (a copy taken after a command
# that wrote it, histcode.store.backup), which the catalog itself stands for
SKIPPED = ("outputs/logs", "data/catalog.duckdb.bak")
LIBRARIES = ("torch", "torchvision", "kornia", "scikit-learn", "lancedb", "pylance", "duckdb", "mlflow",
             "openslide-python", "numpy")
PACKAGE = Path(__file__).resolve().parents[1]  # the histcode package


def _walk(root: Path, skip: tuple[Path, ...]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file under ``root`` (or of ``root`` itself, a file), sorted, ``skip`` left
    out; symlinked folders are followed, each real folder once."""
    if root.is_file():
        st = root.stat()
        return [(str(root), st.st_size, st.st_mtime_ns)]
    out, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        here = Path(folder)
        real = os.path.realpath(here)
        if real in seen:  # a link back into a folder already walked
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if here / d not in skip)
        for name in sorted(files):
            path = here / name
            if path in skip:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:  # removed while walking (a temporary file), or a dangling link
                continue
            out.append((str(path), st.st_size, st.st_mtime_ns))
    return out


def _code_digest() -> str:
    h = hashlib.sha1()
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE)).encode())
        h.update(path.read_bytes())
    for name in LIBRARIES:
        try:
            h.update(f"{name}={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name}=absent".encode())
    return h.hexdigest()


def fingerprint(root: Path, config: dict, inputs: Iterable[Path], stores: dict[str, str]) -> str:
    """The fingerprint of a workspace's demo inputs and state (see the module's docstring). ``inputs``: the
    files and folders the config names (the demo cohort, its source tiles, the expression matrix, the probe's
    tiles), walked unless they lie inside the state folders; ``stores``: where the vectors and runs live."""
    root = root.resolve()
    state = tuple(root / folder for folder in STATE_DIRS)
    skip = tuple(root / s for s in SKIPPED) + (root / "outputs" / STAMP,)
    h = hashlib.sha1(json.dumps({"config": config, "stores": stores}, sort_keys=True, default=str).encode())
    h.update(_code_digest().encode())
    for folder in state:
        for row in _walk(folder, skip):
            h.update(repr(row).encode())
    for path in sorted({Path(os.path.abspath(p)) for p in inputs}):
        h.update(str(path).encode())
        if path.exists() and not any(path.is_relative_to(folder) for folder in state):
            for row in _walk(path, ()):
                h.update(repr(row).encode())
    return h.hexdigest()


def stamp_path(root: Path) -> Path:
    return root / "outputs" / STAMP


def read_stamp(root: Path, current: str) -> dict | None:
    """The stamp when its fingerprint is ``current`` (nothing to do), else None."""
    path = stamp_path(root)
    try:
        stamp = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return stamp if stamp.get("fingerprint") == current else None


def write_stamp(root: Path, current: str, summary: str) -> Path:
    """Record a complete run: its fingerprint (taken after its last write) and the summary it printed."""
    path = stamp_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": current, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "summary": summary}, indent=1))
    os.replace(tmp, path)  # never a half-written stamp
    log.debug("demo stamp %s written", path)
    return path
