"""Register slides in the catalog: skip unchanged files, re-register changed ones, record failures.

An unchanged file (same path, size and mtime, same accession, cohort and scale request) is not even opened. A
file whose size or mtime moved is inspected again; if its content hash and scale are the same, nothing
downstream changes. Each slide is its own transaction, so one bad file never blocks or half-writes another.

Every slide belongs to a cohort (the source's, else the command's, else ``ingest.cohort``); a cohort's role
(training or inference) is fixed when it is first used. ``keep_other_cohorts`` is prediction's mode: a slide
already registered in another cohort stays where it is (and is predicted as it is) when its file has the same
content, and is refused, with nothing written, when the same id names other pixels.

A file that cannot be a slide is registered failed with the reason. A fault of the machine while a slide is
inspected or committed (a full disk, a failing device, no file handles or memory left) is not the file's: the
slide is not attempted (nothing of it is written), the run stops with a ``MachineFault`` saying what happened
and what was kept, and a plain rerun picks it up.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from histcode.config import IngestConfig
from histcode.errors import MachineFault, machine_errno, machine_faults_told
from histcode.ingest.inspect import inspect_slide
from histcode.wsi.files import file_signature
from histcode.ingest.sources import SlideSource, id_problem, split_duplicates
from histcode.store.catalog import Catalog
from histcode.runtime import failpoint
from histcode.store.records import FAILED, OK, TRAINING, SlideRecord, is_path_attribute

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
    cohort: str | None = None


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


def _same_file(a: str | Path, b: str | Path) -> bool:
    return a == b or Path(a).resolve() == Path(b).resolve()


def is_unchanged(existing: dict | None, source: SlideSource, cohort: str, default_mpp: float | None = None) -> bool:
    """Whether a registered, healthy slide can be skipped without opening its file."""
    if existing is None or existing["status"] != OK or existing.get("cohort") != cohort:
        return False
    signature = file_signature(source.path)
    if signature is None or not _same_file(existing["path"], source.path):
        return False
    if (existing["file_size"], existing["file_mtime"]) != signature:
        return False
    if existing["patient_id"] != source.patient_id:
        return False
    if not _same_attributes(existing.get("attributes"), dict(source.attributes)):
        return False
    # the user's mpp and ingest.default_mpp are fallbacks: they only matter for slides whose scale came from them
    if existing["mpp_source"] == "params":
        return source.mpp is None and existing["mpp_x"] == default_mpp
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
        cohort=record.cohort,
    )


def unchanged_outcome(existing: dict, source: SlideSource) -> IngestOutcome:
    return IngestOutcome(
        slide_id=source.slide_id, path=str(source.path), action=UNCHANGED, status=OK, vendor=existing["vendor"],
        mpp=existing["mpp_x"], mpp_source=existing["mpp_source"], levels=existing["level_count"],
        cohort=existing["cohort"],
    )


def commit_record(catalog: Catalog, record: SlideRecord, existing: dict | None) -> IngestOutcome:
    """Write an inspected slide to the catalog and say what happened to it. A file whose pixels are already
    registered under another slide id fails: the two would share their tiles (tile ids hash the content)."""
    fresh = existing is None or existing["content_hash"] != record.content_hash  # pixels new to this id
    twin = catalog.slide_with_content(record.content_hash, record.slide_id) if record.status == OK and fresh else None
    if twin is not None:
        record.status = FAILED
        record.reason = (f"same pixels (content hash {record.content_hash[:12]}) as slide {twin['slide_id']!r} of "
                         f"cohort {twin['cohort']!r}: a slide is registered once; use that slide_id")
    result = catalog.put_slide(record)
    if record.status == FAILED:  # includes 'unreachable': derived rows are kept, see Catalog.put_slide
        action = FAILED_ACTION
        log.warning("%s (%s): failed: %s", record.slide_id, Path(record.path).name, record.reason)
    elif result == "new":
        action = REGISTERED
    elif result == "changed":
        action = CHANGED
    elif (existing is not None and _same_file(existing["path"], record.path) and existing["patient_id"] == record.patient_id
          and _same_attributes(existing.get("attributes"), record.attributes) and existing.get("cohort") == record.cohort):
        action = UNCHANGED  # touched (mtime) but same content and scale
    else:
        action = UPDATED  # moved, re-assigned or put in another cohort, same pixels: tiles stay valid
        if existing is not None and existing.get("cohort") != record.cohort:
            log.info("%s: moved from cohort %s to %s", record.slide_id, existing.get("cohort"), record.cohort)
    return _outcome(record, action)


def _same_attributes(a: str | dict | None, b: str | dict | None) -> bool:
    """Attributes (JSON or dict) equal, file-valued ones compared as the files they name."""
    a, b = (json.loads(x) if isinstance(x, str) else dict(x or {}) for x in (a, b))
    if a.keys() != b.keys():
        return False
    return all(_same_file(a[k], b[k]) if is_path_attribute(k) and a[k] and b[k] else a[k] == b[k] for k in a)


@dataclass
class PendingSlide:
    """A slide that must be inspected: registered in ``cohort`` once inspected, or, with ``compare_only``,
    compared with the registered slide of another cohort that its id names (prediction's mode)."""

    source: SlideSource
    cohort: str
    existing: dict | None
    compare_only: bool = False


def finish_slide(catalog: Catalog, pending: PendingSlide, record: SlideRecord) -> IngestOutcome:
    """Commit an inspected slide (or, compare-only, check it against the registered one) and say what happened."""
    if not pending.compare_only:
        record.cohort = pending.cohort
        return commit_record(catalog, record, pending.existing)
    existing, source = pending.existing, pending.source
    if (record.status == OK and existing["status"] == OK and record.content_hash == existing["content_hash"]
            and (record.mpp_x, record.mpp_y) == (existing["mpp_x"], existing["mpp_y"])):
        return unchanged_outcome(existing, source)  # the same pixels: used where they are, nothing written
    reason = (record.reason if record.status != OK else
              f"slide_id {source.slide_id!r} already names a slide of cohort {existing['cohort']!r} with other "
              f"content ({existing['path']}); give this file another slide_id (a manifest's slide_id column)")
    return refused_outcome(source, reason)


@dataclass
class IngestPlan:
    report: IngestReport  # refused and unchanged slides, already decided
    pending: list[PendingSlide]


def plan_ingest(sources: list[SlideSource], catalog: Catalog, cfg: IngestConfig, cohort: str | None = None,
                role: str = TRAINING, keep_other_cohorts: bool = False) -> IngestPlan:
    """Decide what each source needs without opening any file that is unchanged: refused (duplicate or
    unusable id), unchanged, or to inspect. Registers the cohorts first (``cohort``, default ``cfg.cohort``; a
    source's own cohort wins) as cohorts of ``role``: CatalogError, with nothing written, when one exists with
    another role."""
    report, pending = IngestReport(), []
    cohort = cohort or cfg.cohort
    kept, refused = split_duplicates(sources)
    for name in sorted({s.cohort or cohort for s in kept}):
        catalog.put_cohort(name, role)
    report.outcomes.extend(refused_outcome(source, reason) for source, reason in refused)
    for source in kept:
        problem = id_problem(source.slide_id)
        if problem:
            report.outcomes.append(refused_outcome(source, problem))
            continue
        target = source.cohort or cohort
        existing = catalog.get_slide(source.slide_id)
        if keep_other_cohorts and existing is not None and existing.get("cohort") != target:
            if is_unchanged(existing, source, existing["cohort"], cfg.default_mpp):
                report.outcomes.append(unchanged_outcome(existing, source))
            else:
                pending.append(PendingSlide(source, existing["cohort"], existing, compare_only=True))
        elif is_unchanged(existing, source, target, cfg.default_mpp):
            report.outcomes.append(unchanged_outcome(existing, source))
        else:
            pending.append(PendingSlide(source, target, existing))
    return IngestPlan(report, pending)


def refused_outcome(source: SlideSource, reason: str) -> IngestOutcome:
    log.warning("%s: %s", source.path, reason)
    return IngestOutcome(source.slide_id, str(source.path), FAILED_ACTION, FAILED, reason, cohort=source.cohort)


def ingest_sources(sources: list[SlideSource], catalog: Catalog, cfg: IngestConfig, progress: bool = True,
                   cohort: str | None = None, role: str = TRAINING, keep_other_cohorts: bool = False) -> IngestReport:
    """Register ``sources`` in ``cohort`` (see ``plan_ingest``), inspecting the slides one by one."""
    plan = plan_ingest(sources, catalog, cfg, cohort, role, keep_other_cohorts)
    for done, pending in enumerate(tqdm(plan.pending, desc="ingest", unit="slide", disable=not progress)):
        doing = f"registering slide {pending.source.slide_id} ({Path(pending.source.path).name})"
        kept = (f"nothing of slide {pending.source.slide_id} was written; the {done} slides registered before it "
                f"are kept and {len(plan.pending) - done} (it included) were not attempted: a plain rerun registers them")
        with machine_faults_told(doing, kept):
            failpoint("ingest.slide")
            record = inspect_slide(pending.source, cfg)
            if record.status == FAILED and machine_errno(record.reason) is not None:  # the disk's, not the file's
                raise MachineFault(machine_errno(record.reason), doing, detail=record.reason[:200])
            plan.report.outcomes.append(finish_slide(catalog, pending, record))
        failpoint("ingest.committed")
    position = {(s.slide_id, str(s.path)): i for i, s in reversed(list(enumerate(sources)))}
    plan.report.outcomes.sort(key=lambda o: position.get((o.slide_id, o.path), len(sources)))  # the sources' order
    plan.report.log_summary()
    return plan.report
