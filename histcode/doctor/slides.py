"""A sample of slides, checked as ingest and tiling would see them: the file opens and decodes, it has a usable
scale, it still matches what was ingested, and its tissue mask finds tissue.

The sample is spread evenly over the catalog's ingested slides (sorted by id), so a cohort of thousands is
checked in seconds; files named on the command line (``--slides``) are checked before they are ingested, with
the scale they would get (the file's own, else ``--mpp``, else none).
"""

from __future__ import annotations

from pathlib import Path

from histcode.config import HistcodeConfig
from histcode.doctor.finding import FAIL, OK, WARN, Finding
from histcode.ingest.inspect import inspect_slide
from histcode.ingest.sources import SlideSource, expand_paths, patient_of, slide_id_of
from histcode.store.records import OK as RECORD_OK

AREA = "slides"


def sample_evenly(rows: list[dict], n: int) -> list[dict]:
    """``n`` rows spread over ``rows`` (all of them when there are fewer)."""
    if n <= 0 or len(rows) <= n:
        return rows if n > 0 else []
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


def tissue_fraction(path: Path, mpp: float, cfg: HistcodeConfig) -> float:
    """The share of the slide's area the tiling's tissue mask calls tissue (at the mask's resolution)."""
    from histcode.runtime import resolve_device
    from histcode.wsi.dispatch import open_slide
    from histcode.wsi.reader import render_at_mpp
    from histcode.wsi.tissue import detect_tissue

    with open_slide(path) as reader:
        low, low_ds = render_at_mpp(reader, mpp, cfg.tiling.mask.mpp)
    mask = detect_tissue(low, low_ds[0] * mpp, low_ds, cfg.tiling.mask, resolve_device("cpu"))
    return float(mask.tissue_fraction)


def _check_source(source: SlideSource, cfg: HistcodeConfig, item: str, ingested: dict | None = None) -> Finding:
    record = inspect_slide(source, cfg.ingest)
    if record.status != RECORD_OK:
        reason = record.reason or "cannot be read"
        fix = ("give its scale with `histcode ingest --mpp UM_PER_PX` (or a manifest mpp column, or "
               "ingest.default_mpp)" if "scale" in reason or "mpp" in reason else
               "replace the file with a good copy, or convert it (docs/ingest.md, Formats)")
        return Finding(AREA, item, FAIL, reason, fix)
    notes = []
    if ingested is not None and ingested.get("content_hash") and record.content_hash != ingested["content_hash"]:
        notes.append("its file changed since it was ingested")
    try:
        fraction = tissue_fraction(Path(record.path), float(record.mpp_x), cfg)
    except Exception as exc:  # noqa: BLE001 -- a decode error deep in a level: report it, go on with the sample
        return Finding(AREA, item, FAIL, f"the tissue mask could not be made: {exc}",
                       "replace the file with a good copy")
    scale = f"{record.width}x{record.height} px at {record.mpp_x:.4g} um/px ({record.mpp_source}), {record.vendor}"
    if fraction <= 0:
        return Finding(AREA, item, FAIL, f"{scale}: no tissue found by the tissue mask",
                       "a blank slide, or tiling.mask too strict (docs/tiling.md)")
    if notes:
        return Finding(AREA, item, WARN, f"{scale}; " + "; ".join(notes), "run `histcode ingest` again")
    return Finding(AREA, item, OK, f"{scale}; tissue {fraction:.0%} of the slide")


def catalog_sample_checks(catalog_rows: list[dict], cfg: HistcodeConfig, n: int) -> list[Finding]:
    """``catalog_rows``: the catalog's slides (any status). Failed ones are summed up, a sample of the rest
    checked."""
    failed = [r for r in catalog_rows if r["status"] != RECORD_OK]
    out = []
    if failed:
        shown = "; ".join(f"{r['slide_id']}: {r['reason']}" for r in failed[:5])
        out.append(Finding(AREA, f"{len(failed)} slide(s) failed at ingest", WARN, shown + ("; ..." if len(failed) > 5
                           else ""), "fix or remove them and run `histcode ingest` (`histcode sql \"SELECT slide_id, "
                           "reason FROM slides WHERE status = 'failed'\"` lists them)"))
    ok = sorted((r for r in catalog_rows if r["status"] == RECORD_OK), key=lambda r: r["slide_id"])
    for row in sample_evenly(ok, n):
        given = float(row["mpp_x"]) if row.get("mpp_source") in ("user", "params") and row.get("mpp_x") else None
        source = SlideSource(Path(row["path"]), row["slide_id"], row.get("patient_id") or row["slide_id"], mpp=given)
        out.append(_check_source(source, cfg, f"slide {row['slide_id']}", ingested=row))
    return out


def path_checks(paths: list[Path], cfg: HistcodeConfig, mpp: float | None) -> list[Finding]:
    out = []
    for path in expand_paths(paths, tuple(cfg.ingest.extensions)):
        slide_id = slide_id_of(path)
        source = SlideSource(path, slide_id, patient_of(slide_id), mpp=mpp)
        out.append(_check_source(source, cfg, f"file {path}"))
    if not out:
        out.append(Finding(AREA, "slides " + ", ".join(map(str, paths)), FAIL, "no slide file found there"))
    return out
