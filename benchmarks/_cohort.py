"""Shared by the benchmarks: a workspace whose catalog holds the tiled demo cohort."""

from __future__ import annotations

import tempfile
from pathlib import Path

from histcode.workspace import Workspace


def demo_workspace(path: Path | None) -> tuple[Workspace, tempfile.TemporaryDirectory | None]:
    """``path`` if given (built and ingested there if it holds no slides yet), else a temporary workspace.
    Returns the workspace and the temporary directory to clean up (or None)."""
    from histcode.demo.build import build_demo_cohort
    from histcode.ingest.run import ingest_sources
    from histcode.ingest.sources import read_manifest
    from histcode.store.catalog import Catalog

    tmp = None
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="histcode-bench-")
        path = Path(tmp.name)
    ws = Workspace(path.resolve()).ensure()
    cfg = ws.config()
    catalog = Catalog.of(ws)
    if not catalog.slides(status="ok"):
        print("building and ingesting the demo cohort ...", flush=True)
        cohort = build_demo_cohort(cfg.demo, ws.path(cfg.demo.out_dir), workers=2, progress=False)
        ingest_sources(read_manifest(cohort.manifest), catalog, cfg.ingest, progress=False)
    return ws, tmp
