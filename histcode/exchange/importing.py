"""`histcode import trident|clam DIR`: another tool's per-slide feature files as a HistCode feature view.

A lab that extracted features with TRIDENT or CLAM keeps them: each file's vectors and level-0 corners become
the tile and slide tables of an imported view (``identity``), its patches the tiles of an imported tiling spec
in the catalog, and its slide a ledger row, so `histcode search`, `histcode heads --view`, the viewer and the
exports read it like a view HistCode embedded. Slides must be ingested first: a file is matched to the slide
whose id (else whose file stem) is the file's stem, as both tools name their files.

Each file is checked whole before anything is written (``patches.check_file``); one that fails is reported by
name with the reason and the rest go on. Checked slides are written ``features.commit_every_slides`` at a time:
vectors first (one Lance commit per table, upserts on the ids), then each slide's tiles and tiling row (one
catalog transaction), then the ledger rows. A process killed in between leaves vectors the rerun rewrites in
place, or tiles without a ledger row, which the rerun imports again; a slide whose tiles cannot be committed
loses the vectors just written for it. A rerun skips files whose content (``patches.content_digest``: grid,
encoder, corners, vectors) and slide are unchanged, wherever the file now lies.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from histcode.config import HistcodeConfig
from histcode.exchange.h5files import ExchangeError, read_feature_file
from histcode.exchange.identity import imported_view
from histcode.exchange.ledger import imported_digests, record_imported
from histcode.exchange.patches import TOOLS, ClamGrid, SlidePatches, check_file
from histcode.features.registry import (
    FeatureView,
    done_slides,
    record_materializations,
    record_table_versions,
    register_view,
    set_view_status,
)
from histcode.features.upkeep import maintain_tables
from histcode.store.catalog import TILE_SCHEMA, Catalog, SlideChangedError
from histcode.store.records import OK, TilingRecord, utcnow
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, connect, delete_slides, open_table, to_batch, upsert_slides
from histcode.tiling.spec import spec_id_of, tile_id_of
from histcode.workspace import Workspace

log = logging.getLogger(__name__)

IMPORTED, SKIPPED, FAILED = "imported", "skipped", "failed"


@dataclass
class ImportOutcome:
    file: str
    slide_id: str | None
    action: str  # imported | skipped | failed
    rows: int = 0
    reason: str | None = None


@dataclass
class ImportReport:
    tool: str
    folder: Path
    view: FeatureView | None = None
    outcomes: list[ImportOutcome] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    maintenance: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[ImportOutcome]:
        return [o for o in self.outcomes if o.action == FAILED]

    def count(self, action: str) -> int:
        return sum(o.action == action for o in self.outcomes)

    def as_rows(self) -> list[dict]:
        return [o.__dict__.copy() for o in self.outcomes]


def find_feature_files(tool: str, folder: Path, encoder: str | None = None) -> list[tuple[Path, str | None]]:
    """(file, encoder named by its folder) of every feature file under ``folder``: its own ``*.h5``; else, for
    TRIDENT, those of the one ``features_<encoder>`` folder below it (``--encoder`` picks one of several), for
    CLAM those of ``h5_files/``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExchangeError(f"{folder}: no such folder")
    def hint(d: Path) -> str | None:
        return d.name[len("features_"):] if tool == "trident" and d.name.startswith("features_") else None

    direct = sorted(folder.glob("*.h5"))
    if direct:
        return [(p, hint(folder)) for p in direct]
    if tool == "clam":
        dirs = [folder / "h5_files"] if (folder / "h5_files").is_dir() else []
    else:
        dirs = sorted(d for d in folder.rglob("features_*") if d.is_dir() and any(d.glob("*.h5")))
        if encoder:
            dirs = [d for d in dirs if d.name == f"features_{encoder}"]
        if len(dirs) > 1:
            raise ExchangeError(f"{folder}: several TRIDENT feature folders ({', '.join(str(d.relative_to(folder)) for d in dirs)}): "
                                "pass --encoder NAME to pick features_NAME")
    files = [(p, hint(d)) for d in dirs for p in sorted(d.glob("*.h5"))]
    if not files:
        where = "*.h5 or h5_files/*.h5" if tool == "clam" else "*.h5 or features_<encoder>/*.h5"
        raise ExchangeError(f"{folder}: no {tool} feature files ({where})")
    return files


class SlideMatcher:
    """A file stem -> the catalog's slide: by slide id, else by the stem of the slide's file (unique only)."""

    def __init__(self, catalog: Catalog) -> None:
        self.by_id = {s["slide_id"]: s for s in catalog.slides()}
        self.by_stem: dict[str, list[dict]] = {}
        for s in self.by_id.values():
            self.by_stem.setdefault(Path(s["path"]).stem, []).append(s)

    def slide(self, stem: str) -> dict:
        found = self.by_id.get(stem)
        if found is None:
            same = self.by_stem.get(stem, [])
            if len(same) > 1:
                raise ExchangeError(f"{len(same)} slides have file stem {stem!r} "
                                    f"({', '.join(s['slide_id'] for s in same)}): rename the file to its slide id")
            if not same:
                raise ExchangeError(f"no slide {stem!r} in the catalog (by id or file stem): run `histcode ingest` "
                                    "on its slide first")
            found = same[0]
        if found["status"] != OK or not found.get("content_hash"):
            raise ExchangeError(f"slide {found['slide_id']!r} is not ingested cleanly ({found.get('reason')})")
        return found


def _attributes(slide: dict, columns: tuple[str, ...]) -> dict[str, str | None]:
    attrs = json.loads(slide["attributes"]) if slide.get("attributes") else {}
    return {c: (None if attrs.get(c) in (None, "") else str(attrs[c])) for c in columns}


class ImportWriter:
    """Writes checked slides into the imported view: vectors, then tiles and tiling row, then ledger rows."""

    def __init__(self, ws: Workspace, cfg: HistcodeConfig, report: ImportReport) -> None:
        self.ws, self.cfg, self.report = ws, cfg, report
        self.catalog = Catalog.of(ws)
        self.view: FeatureView | None = None
        self.tables: dict = {}
        self.pending: list[SlidePatches] = []
        self.written = 0

    def open(self, view: FeatureView, grid: dict) -> None:
        """Register the imported spec and view (once the first slide is ready to be written)."""
        self.catalog.put_spec(view.spec_id, grid)
        register_view(self.catalog, view)
        db = connect(self.ws.lancedb_uri)
        self.tables = {kind: open_table(db, view.table(kind)) for kind in (TILE_KIND, SLIDE_KIND)}
        self.view = view

    def add(self, patches: SlidePatches) -> None:
        self.pending.append(patches)
        if len(self.pending) >= self.cfg.features.commit_every_slides:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        view, batch = self.view, self.pending
        self.pending = []
        version = self._write_vectors(batch)
        ledger, files = [], []
        current_spec = spec_id_of(self.cfg.tiling)
        for p in batch:
            try:
                self.catalog.put_tiling(self._tiling_record(p, current_spec), self._tiles(p))
            except SlideChangedError as exc:
                tables = [view.table(kind).name for kind in (TILE_KIND, SLIDE_KIND)]
                delete_slides(self.ws.lancedb_uri, tables, [p.slide_id])
                self.report.outcomes.append(ImportOutcome(p.source.name, p.slide_id, FAILED, reason=str(exc)))
                continue
            n = len(p.coords)
            ledger.append({"slide_id": p.slide_id, "content_hash": p.slide["content_hash"], "rows": n, "status": OK,
                           "lance_version": version, "started_at": utcnow()})
            files.append({"slide_id": p.slide_id, "source": str(p.source), "sha256": p.sha256, "n_tiles": n})
            self.report.outcomes.append(ImportOutcome(p.source.name, p.slide_id, IMPORTED, n))
            self.written += n
        record_materializations(self.catalog, view.view_id, ledger, self.tables)
        record_imported(self.catalog, view.view_id, self.report.tool, files)

    def _tile_ids(self, p: SlidePatches) -> list[str]:
        return [tile_id_of(p.slide["content_hash"], self.view.spec_id, int(x), int(y), p.size) for x, y in p.coords]

    def _tiles(self, p: SlidePatches) -> pa.Table:
        n = len(p.coords)
        empty = pa.nulls(n, pa.float32())
        return pa.table({"tile_id": self._tile_ids(p), "slide_id": [p.slide_id] * n, "spec_id": [self.view.spec_id] * n,
                         "x": p.coords[:, 0], "y": p.coords[:, 1], "size": np.full(n, p.size, np.int32),
                         "level": np.full(n, p.level, np.int32), "tissue_fraction": empty, "white_fraction": empty,
                         "laplacian_var": empty}).cast(TILE_SCHEMA)

    def _tiling_record(self, p: SlidePatches, current_spec: str) -> TilingRecord:
        """The imported grid's ledger row; the slide's tissue mask and QC picture from HistCode's own tiling
        where it has one (the same pixels), so the viewer can draw them under the imported tiles."""
        own = self.catalog.tiling(p.slide_id, current_spec) or {}
        same = own.get("content_hash") == p.slide["content_hash"]
        n = len(p.coords)
        return TilingRecord(slide_id=p.slide_id, spec_id=self.view.spec_id, content_hash=p.slide["content_hash"],
                            status=OK, n_candidates=n, n_tiles=n, tile_size_l0=p.size, read_level=p.level,
                            thumbnail_path=own.get("thumbnail_path") if same else None,
                            mask_path=own.get("mask_path") if same else None)

    def _write_vectors(self, batch: list[SlidePatches]) -> int:
        view = self.view
        cols = view.attribute_columns
        tile_cols: dict[str, list] = {k: [] for k in ("tile_id", "slide_id", "patient_id", "x", "y", "size", *cols)}
        slide_cols: dict[str, list] = {k: [] for k in ("slide_id", "patient_id", "n_tiles", *cols)}
        for p in batch:
            n, attrs = len(p.coords), _attributes(p.slide, cols)
            tile_cols["tile_id"] += self._tile_ids(p)
            tile_cols["slide_id"] += [p.slide_id] * n
            tile_cols["patient_id"] += [p.slide["patient_id"]] * n
            tile_cols["x"] += p.coords[:, 0].tolist()
            tile_cols["y"] += p.coords[:, 1].tolist()
            tile_cols["size"] += [p.size] * n
            slide_cols["slide_id"].append(p.slide_id)
            slide_cols["patient_id"].append(p.slide["patient_id"])
            slide_cols["n_tiles"].append(n)
            for c in cols:
                tile_cols[c] += [attrs[c]] * n
                slide_cols[c].append(attrs[c])
        tile_cols["vector"] = np.concatenate([p.vectors for p in batch])
        slide_cols["vector"] = np.stack([p.vectors.mean(axis=0) for p in batch])  # the slide table: mean of tiles
        sids = [p.slide_id for p in batch]
        tiles, slides = view.table(TILE_KIND), view.table(SLIDE_KIND)
        version = upsert_slides(self.tables[TILE_KIND], tiles, to_batch(tiles, tile_cols), sids)
        upsert_slides(self.tables[SLIDE_KIND], slides, to_batch(slides, slide_cols), sids)
        return version


def import_features(ws: Workspace, cfg: HistcodeConfig, tool: str, folder: Path, encoder: str | None = None,
                    clam: ClamGrid | None = None) -> ImportReport:
    """Import every feature file of ``tool`` under ``folder`` into one view; ``encoder`` names the extraction
    where the files do not (CLAM's never do) and must agree with them where they do."""
    if tool not in TOOLS:
        raise ExchangeError(f"unknown tool {tool!r} (known: {', '.join(TOOLS)})")
    report = ImportReport(tool, Path(folder))
    files = find_feature_files(tool, Path(folder), encoder)
    catalog = Catalog.of(ws)
    matcher = SlideMatcher(catalog)
    writer = ImportWriter(ws, cfg, report)
    first: tuple[str, int, dict] | None = None  # (encoder, dim, grid) of the first good file: the view's
    done: dict[str, str] = {}
    digests: dict[str, str] = {}

    def fail(path: Path, slide_id: str | None, reason: str) -> None:
        log.warning("%s: not imported: %s", path.name, reason)
        report.outcomes.append(ImportOutcome(path.name, slide_id, FAILED, reason=reason))

    for path, folder_encoder in files:
        slide_id = None
        try:
            slide = matcher.slide(path.stem)
            slide_id = slide["slide_id"]
            ff = read_feature_file(path)
            named = ff.features_attrs.get("encoder")
            if encoder and named and named != encoder:
                raise ExchangeError(f"{path.name}: extracted with encoder {named!r}, not --encoder {encoder!r}")
            name = encoder or named or folder_encoder
            if not name:
                raise ExchangeError(f"{path.name}: the file does not name its encoder: pass --encoder NAME")
            patches = check_file(ff, tool, slide, name, clam)
        except ExchangeError as exc:
            fail(path, slide_id, str(exc).removeprefix(f"{path.name}: "))
            continue
        if first is None:
            first = (name, patches.dim, patches.grid)
            view = imported_view(tool, name, patches.dim, patches.grid, cfg.features.attribute_columns)
            report.view = view
            done, digests = done_slides(catalog, view.view_id), imported_digests(catalog, view.view_id)
        differs = [what for what, mine, theirs in (("encoder", name, first[0]), ("dimension", patches.dim, first[1]),
                                                    ("grid", patches.grid, first[2])) if mine != theirs]
        if differs:
            fail(path, slide_id, f"its {' and '.join(differs)} ({name}, {patches.dim}-d, {patches.grid}) differ from "
                                 f"the first file's ({first[0]}, {first[1]}-d, {first[2]}): import it separately")
            continue
        if any(p.slide_id == slide_id for p in writer.pending) or any(
                o.slide_id == slide_id and o.action != FAILED for o in report.outcomes):
            fail(path, slide_id, f"a second file for slide {slide_id!r}")
            continue
        if done.get(slide_id) == slide["content_hash"] and digests.get(slide_id) == patches.sha256:
            report.outcomes.append(ImportOutcome(path.name, slide_id, SKIPPED, len(patches.coords)))
            continue
        if writer.view is None:
            writer.open(report.view, patches.grid)
        writer.add(patches)
    if writer.view is not None:
        writer.flush()
    if report.view is not None and writer.view is not None:
        set_view_status(catalog, report.view.view_id, "ok" if not report.failed else "partial")
        report.maintenance = maintain_tables(writer.tables, cfg.features, changed=writer.written > 0, tag=None)
        record_table_versions(catalog, report.view.view_id, writer.tables)  # compacted: the same rows
        report.versions = {kind: t.version for kind, t in writer.tables.items()}
    report.outcomes.sort(key=lambda o: o.file)
    log.info("import %s %s: %d imported, %d skipped, %d failed (view %s)", tool, folder, report.count(IMPORTED),
             report.count(SKIPPED), len(report.failed), report.view.view_id if report.view else "none")
    return report
