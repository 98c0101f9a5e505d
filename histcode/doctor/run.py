"""All of doctor's checks in order, as one list of findings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from histcode.config import HistcodeConfig
from histcode.doctor import encoders, environment, exposure, slides, stores
from histcode.doctor.finding import Finding
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

AREAS = ("environment", "stores", "encoders", "slides", "exposure")


@dataclass(frozen=True)
class DoctorOptions:
    """``sample``: catalog slides to open; ``slide_paths``: files or folders to check instead (before ingest),
    with ``mpp`` as `histcode ingest --mpp` would give it; ``weights``: foundation encoder name -> a local weight
    file or Hugging Face cache folder to check; ``areas``: which of ``AREAS`` to run."""

    sample: int = 5
    slide_paths: tuple[Path, ...] = ()
    mpp: float | None = None
    weights: dict[str, Path] = field(default_factory=dict)
    areas: tuple[str, ...] = AREAS


def _catalog_slides(ws: Workspace) -> list[dict]:
    import duckdb

    from histcode.store.catalog import Catalog

    if not ws.catalog_path.exists():
        return []
    try:
        con = duckdb.connect(str(ws.catalog_path), read_only=True)
    except duckdb.Error:
        return []  # stores already reported why
    try:
        cursor = con.execute("SELECT * FROM slides ORDER BY slide_id")
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, r)) for r in cursor.fetchall()]
    except duckdb.Error:
        return []
    finally:
        con.close()
    catalog = Catalog(ws.catalog_path, ws.root)
    return [catalog.resolved(r) for r in rows]  # stored paths (relative to the workspace) as real ones


def run_doctor(ws: Workspace, cfg: HistcodeConfig, options: DoctorOptions = DoctorOptions()) -> list[Finding]:
    unknown = set(options.areas) - set(AREAS)
    if unknown:
        from histcode.errors import UsageError

        raise UsageError(f"unknown doctor area(s) {', '.join(sorted(unknown))}: choose from {', '.join(AREAS)}")
    findings: list[Finding] = []
    if "environment" in options.areas:
        findings += environment.environment_checks(ws.root, cfg)
    views: list[dict] = []
    client = None
    if "stores" in options.areas or "encoders" in options.areas:
        found, views, ledger = stores.catalog_checks(ws)
        mlflow_finding, client = stores.mlflow_check(ws)
        if "stores" in options.areas:
            findings += found
            findings += stores.vector_checks(ws, views, ledger)
            findings.append(mlflow_finding)
            findings += stores.service_checks()
            findings.append(stores.label_check(ws))
    if "encoders" in options.areas:
        if client is not None:
            findings += encoders.registered_version_checks(client, cfg)
            findings += encoders.view_encoder_checks(client, views)
            findings.append(encoders.configured_encoder_check(client, cfg))
        for name, path in options.weights.items():
            findings.append(encoders.weight_file_check(name, Path(path)))
    if "slides" in options.areas:
        if options.slide_paths:
            findings += slides.path_checks(list(options.slide_paths), cfg, options.mpp)
        else:
            findings += slides.catalog_sample_checks(_catalog_slides(ws), cfg, options.sample)
    if "exposure" in options.areas:
        if client is None and "stores" not in options.areas and "encoders" not in options.areas:
            _, client = stores.mlflow_check(ws)
        findings += exposure.exposure_checks(ws, cfg, client)
    log.debug("doctor: %d findings", len(findings))
    return findings
