"""Great Expectations Data Docs that read offline.

GX's pages load jQuery, Bootstrap, bootstrap-table, Vega and Font Awesome from CDNs; without a network the index
lists no validations (its tables are built by those scripts). ``make_offline`` copies local copies of them
(``datadocs_assets/``, taken from their npm packages, see its README) to ``<site>/static/vendor/`` and points every
page of the site at them by relative paths. Running it again changes nothing.
"""

from __future__ import annotations

import filecmp
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "datadocs_assets"
VENDOR = Path("static") / "vendor"

# CDN URL -> file under datadocs_assets/ (see its README for packages, versions and licences)
CDN_ASSETS = {
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery@3.7.1/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.js@1.12.9/umd/popper.min.js",
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap@4.3.1/css/bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap@4.3.1/js/bootstrap.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table@1.19.1/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table@1.19.1/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table@1.19.1/extensions/filter-control/bootstrap-table-filter-control.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table@1.19.0/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table@1.19.0/extensions/filter-control/bootstrap-table-filter-control.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker@1.9.0/css/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker@1.9.0/js/bootstrap-datepicker.min.js",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "forevolve-bootstrap-dark@1.1.0/css/bootstrap-prefers-dark.min.css",
    "https://cdn.jsdelivr.net/npm/vega@5": "vega@5.33.1/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite@5.23.0/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed@6.29.0/vega-embed.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css":
        "fortawesome-fontawesome-free@6.6.0/css/all.min.css",
}
# GX's navbar logo comes from its web-assets bucket (with a timestamp and the context id in the query); GX also
# writes the same image into the site's own static/images/.
GX_WEB_ASSETS = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
GX_IMAGES = Path("static") / "images"

# a resource the page loads (not a link the reader may follow): <script src>, <link href>, <img src>
_REFERENCE = re.compile(
    r"""(<(?:script|link|img)\b[^>]*?\b(?:src|href)\s*=\s*)(["'])(https?://[^"'\s>]+)\2""", re.IGNORECASE)


def _local_target(url: str, site_dir: Path) -> Path | None:
    """The file under ``site_dir`` that replaces ``url``, or None when there is no local copy."""
    if url in CDN_ASSETS:
        return site_dir / VENDOR / CDN_ASSETS[url]
    if url.startswith(GX_WEB_ASSETS):
        name = url[len(GX_WEB_ASSETS):].split("?", 1)[0].split("#", 1)[0]
        image = site_dir / GX_IMAGES / name
        if name and "/" not in name and image.is_file():
            return image
    return None


def _copy_assets(vendor: Path) -> int:
    """Copy datadocs_assets/ to ``vendor``; only files that are missing or differ. Returns how many were copied."""
    copied = 0
    for src in sorted(p for p in ASSETS.rglob("*") if p.is_file()):
        dst = vendor / src.relative_to(ASSETS)
        if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        copied += 1
    return copied


def make_offline(site_dir: Path) -> int:
    """Point every HTML page under ``site_dir`` (a Data Docs site: index.html, expectations/, validations/) at the
    local copies of its CDN scripts and styles, copied to ``<site_dir>/static/vendor/``.

    Each reference gets a path relative to its own page, so the site reads from a file system, a web server or an
    MLflow artifact folder alike. A URL without a local copy is left as it is and logged. Returns how many
    references were rewritten; a second call rewrites and copies nothing.
    """
    site_dir = Path(site_dir)
    copied = _copy_assets(site_dir / VENDOR)
    rewritten = 0
    unknown: set[str] = set()
    for page in sorted(site_dir.rglob("*.html")):
        if VENDOR in page.relative_to(site_dir).parents:
            continue
        text = page.read_text(encoding="utf-8")
        count = 0

        def _replace(match: re.Match) -> str:
            nonlocal count
            prefix, quote, url = match.groups()
            target = _local_target(url, site_dir)
            if target is None:
                unknown.add(url)
                return match.group(0)
            count += 1
            return f"{prefix}{quote}{Path(os.path.relpath(target, page.parent)).as_posix()}{quote}"

        new = _REFERENCE.sub(_replace, text)
        if count:
            tmp = page.with_name(page.name + ".offline-tmp")
            tmp.write_text(new, encoding="utf-8")
            os.replace(tmp, page)
            rewritten += count
    for url in sorted(unknown):
        log.warning("Data Docs: no local copy of %s; left as it is (the page needs a network for it)", url)
    log.debug("Data Docs %s: %d references pointed at local copies, %d asset files copied", site_dir, rewritten, copied)
    return rewritten
