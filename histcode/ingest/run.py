"""Register slides in the catalog: skip unchanged files, re-register changed ones, record failures.

An unchanged file (same path, size and mtime, same accession and scale request) is not even opened. A file
whose size or mtime moved is inspected again; if its content hash and scale are the same, nothing downstream
changes. Each slide is its own transaction, so one bad file never blocks or half-writes another.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from histcode.config import IngestConfig
from histcode.ingest.inspect import inspect_slide
from histcode.wsi.files import file_signature
from histcode.ingest.sources import SlideSource, split_duplicates
from histcode.store.catalog import Catalog
from histcode.store.records import FAILED, OK, SlideRecord

log = logging.getLogger(__name__)

# What happened to each source, as shown in the summary.
REGISTERED, CHANGED, UPDATED, UNCHANGED, FAILED_ACTION = "registered", "changed", "updated", "unchanged", "failed"


@dataclass
class IngestOutcome:
    slide_id: str
    path: str
    action: str
    status: str
    reason: str | None = None
    vendor: str | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    levels: int | None = None


@dataclass
class IngestReport:
    outcomes: list[IngestOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[IngestOutcome]:
        return [o for o in self.outcomes if o.status == FAILED]

    def count(self, action: str) -> int:
        return sum(o.action == action for o in self.outcomes)

    def as_rows(self) -> list[dict]:
        return [o.__dict__.copy() for o in self.outcomes]

    def log_summary(self) -> None:
        log.info(
            "ingest: %d registered, %d changed, %d updated, %d unchanged, %d failed",
            self.count(REGISTERED), self.count(CHANGED), self.count(UPDATED), self.count(UNCHANGED), len(self.failed),
        )


def is_unchanged(existing: dict | None, source: SlideSource) -> bool:
    """Whether a registered, healthy slide can be skipped without opening its file."""
    if existing is None or existing["status"] != OK:
        return False
    signature = file_signature(source.path)
    if signature is None or existing["path"] != str(source.path):
        return False
    if (existing["file_size"], existing["file_mtime"]) != signature:
        return False
    if existing["patient_id"] != source.patient_id:
        return False
    if (json.loads(existing["attributes"]) if existing.get("attributes") else {}) != dict(source.attributes):
        return False
    # the user's mpp is a fallback: it only matters for slides whose scale came from it
    return existing["mpp_source"] != "user" or existing["mpp_x"] == source.mpp


def _outcome(record: SlideRecord, action: str) -> IngestOutcome:
    return IngestOutcome(
        slide_id=record.slide_id,
        path=record.path,
        action=action,
        status=record.status,
        reason=record.reason,
        vendor=record.vendor,
        mpp=record.mpp_x,
        mpp_source=record.mpp_source,
        levels=record.level_count,
    )


def unchanged_outcome(existing: dict, source: SlideSource) -> IngestOutcome:
    return IngestOutcome(
        slide_id=source.slide_id, path=str(source.path), action=UNCHANGED, status=OK, vendor=existing["vendor"],
        mpp=existing["mpp_x"], mpp_source=existing["mpp_source"], levels=existing["level_count"],
    )


def commit_record(catalog: Catalog, record: SlideRecord, existing: dict | None) -> IngestOutcome:
    """Write an inspected slide to the catalog and say what happened to it."""
    result = catalog.put_slide(record)
    if record.status == FAILED:  # includes 'unreachable': derived rows are kept, see Catalog.put_slide
        action = FAILED_ACTION
        log.warning("%s (%s): failed: %s", record.slide_id, Path(record.path).name, record.reason)
    elif result == "new":
        action = REGISTERED
    elif result == "changed":
        action = CHANGED
    elif (existing is not None and existing["path"] == record.path and existing["patient_id"] == record.patient_id
          and existing.get("attributes") == record.attributes):
        action = UNCHANGED  # touched (mtime) but same content and scale
    else:
        action = UPDATED  # moved or re-assigned, same pixels: tiles stay valid
    return _outcome(record, action)


def ingest_one(source: SlideSource, catalog: Catalog, cfg: IngestConfig) -> IngestOutcome:
    existing = catalog.get_slide(source.slide_id)
    if is_unchanged(existing, source):
        return unchanged_outcome(existing, source)
    return commit_record(catalog, inspect_slide(source, cfg), existing)


def refused_outcome(source: SlideSource, reason: str) -> IngestOutcome:
    log.warning("%s: %s", source.path, reason)
    return IngestOutcome(source.slide_id, str(source.path), FAILED_ACTION, FAILED, reason)


def ingest_sources(sources: list[SlideSource], catalog: Catalog, cfg: IngestConfig, progress: bool = True) -> IngestReport:
    report = IngestReport()
    kept, refused = split_duplicates(sources)
    report.outcomes.extend(refused_outcome(source, reason) for source, reason in refused)
    for source in tqdm(kept, desc="ingest", unit="slide", disable=not progress):
        report.outcomes.append(ingest_one(source, catalog, cfg))
    report.log_summary()
    return report

