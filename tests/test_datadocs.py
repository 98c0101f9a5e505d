"""The label gate's Data Docs read offline: every CDN script and style is pointed at a local copy by a path relative
to its page, the index lists its validations in a real headless Chromium that cannot reach the network, and
making a site offline twice changes nothing."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest

import tests.test_labels as label_tests
from histcode.labels.datadocs import ASSETS, CDN_ASSETS, GX_WEB_ASSETS, VENDOR, make_offline
from histcode.labels.run import gate_labels
from histcode.workspace import Workspace
from tests.browser import chromium, is_local, keep_local, serve

LOADED = re.compile(r"""<(script|link|img)\b[^>]*?\b(src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
ROWS = "table.ge-index-page-validation-results-table tbody tr[data-index]"


def _references(page: Path) -> list[tuple[str, str]]:
    """(tag, url) of every resource a page loads (scripts, stylesheets, images; not the links it shows)."""
    return [(m.group(1).lower(), m.group(3)) for m in LOADED.finditer(page.read_text(encoding="utf-8"))]


def _pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


def _snapshot(site: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(site)): (p.stat().st_mtime_ns, p.read_bytes()) for p in site.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def gated(tiled_catalog, tmp_path_factory) -> tuple[Workspace, Path]:
    """A workspace whose good label set went through the real label gate; its Data Docs site."""
    ws = Workspace(tmp_path_factory.mktemp("datadocs") / "tws").ensure()
    shutil.copy2(tiled_catalog, ws.catalog_path)
    label_tests._write(ws, label_tests._good_matrix(ws))
    _, gate = label_tests._run(ws)
    assert gate.passed, gate.summary()
    assert gate.docs is not None and gate.docs.is_file()
    return ws, gate.docs.parent


def test_make_offline_points_each_depth_at_its_relative_copy(tmp_path, caplog) -> None:
    site = tmp_path / "site"
    deep = site / "validations" / "suite" / "__none__" / "20260101T000000Z" / "page.html"
    (site / "static" / "images").mkdir(parents=True)
    (site / "static" / "images" / "logo-long.png").write_bytes(b"png")
    deep.parent.mkdir(parents=True)
    head = ('<link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css">\n'
            '<script src="https://code.jquery.com/jquery-3.7.1.min.js"></script>\n'
            "<script src='https://cdn.jsdelivr.net/npm/vega@5'></script>\n"
            '<script src="https://example.org/unknown.js"></script>\n'
            f'<img class="NO-CACHE" src="{GX_WEB_ASSETS}logo-long.png?d=20260101T000000Z&dataContextId=x"/>\n'
            '<a href="https://greatexpectations.io">a link, not a resource</a>\n')
    (site / "index.html").write_text(head)
    deep.write_text(head)

    with caplog.at_level(logging.WARNING, logger="histcode.labels.datadocs"):
        assert make_offline(site) == 8  # 4 known resources on each of the 2 pages
    assert "https://example.org/unknown.js" in caplog.text and "no local copy" in caplog.text
    index, page = (site / "index.html").read_text(), deep.read_text()
    assert 'href="static/vendor/bootstrap@4.3.1/css/bootstrap.min.css"' in index
    assert "src='static/vendor/vega@5.33.1/vega.min.js'" in index
    assert 'src="static/images/logo-long.png"' in index
    assert 'src="../../../../static/vendor/jquery@3.7.1/jquery.min.js"' in page
    assert 'src="../../../../static/images/logo-long.png"' in page
    for text in (index, page):
        assert '<script src="https://example.org/unknown.js">' in text  # no copy: left alone
        assert '<a href="https://greatexpectations.io">' in text  # a link the reader follows: not a resource
    for asset in set(CDN_ASSETS.values()) | {"README.md"}:
        assert (site / VENDOR / asset).read_bytes() == (ASSETS / asset).read_bytes()

    before = _snapshot(site)
    assert make_offline(site) == 0
    assert _snapshot(site) == before


def test_gate_docs_load_only_local_copies(gated) -> None:
    _, site = gated
    pages = _pages(site)
    depths = {len(p.relative_to(site).parts) for p in pages}
    assert {1, 2, 5} <= depths, depths  # index.html, expectations/<suite>.html, validations/<suite>/<run>/<time>/<file>
    for page in pages:
        refs = _references(page)
        assert refs, page
        left = [url for _, url in refs if url in CDN_ASSETS or url.startswith(GX_WEB_ASSETS)]
        assert not left, f"{page.relative_to(site)} still loads {left}"
        remote = [url for tag, url in refs if tag in ("script", "link") and url.startswith(("http://", "https://"))]
        assert not remote, f"{page.relative_to(site)} loads scripts or styles from {remote}"
        ours = [url for _, url in refs if "static/vendor/" in url or url.endswith("static/images/logo-long.png")]
        assert len(ours) >= 10, f"{page.relative_to(site)}: {refs}"
        for url in ours:  # (GX's own favicon link on validation pages is one level short; not ours to fix)
            assert (page.parent / url).resolve().is_file(), f"{page.relative_to(site)}: {url}"
    assert (site / VENDOR / "README.md").is_file()


@pytest.mark.browser
def test_index_lists_validations_in_chromium_without_a_network(gated) -> None:
    _, site = gated
    deepest = max(_pages(site), key=lambda p: len(p.relative_to(site).parts))
    broken: list[str] = []
    with chromium() as browser, serve(site) as base:
        page = browser.new_page()
        left = keep_local(page)
        page.on("response", lambda r: broken.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("requestfailed", lambda r: broken.append(f"failed {r.url}") if is_local(r.url) else None)

        page.goto(f"{base}/index.html", wait_until="load")
        page.wait_for_selector(ROWS, timeout=30_000)  # bootstrap-table built the rows from the page's data
        rows = page.locator(ROWS)
        assert rows.count() >= 1
        assert "expression" in " ".join(rows.all_inner_texts())
        assert page.evaluate("() => typeof jQuery.fn.bootstrapTable === 'function'")
        assert page.evaluate("async () => { await document.fonts.ready;"
                             " return document.fonts.check('900 16px \"Font Awesome 6 Free\"'); }")

        page.goto(f"{base}/{deepest.relative_to(site).as_posix()}", wait_until="load")
        assert page.evaluate("() => typeof vega === 'object' && typeof vegaLite === 'object'"
                             " && typeof vegaEmbed === 'function' && typeof jQuery.fn.bootstrapTable === 'function'")
        page.close()
    assert not left, f"requests that would have left the machine: {left}"
    assert not broken, f"local requests that failed: {broken}"


def test_make_offline_twice_changes_nothing_and_a_new_gate_run_stays_offline(gated) -> None:
    ws, site = gated
    before = _snapshot(site)
    assert make_offline(site) == 0
    assert _snapshot(site) == before

    assert gate_labels(ws, ws.config(), force=True).passed  # GX renders the index and new validation pages again
    for page in _pages(site):
        assert not [url for _, url in _references(page) if url in CDN_ASSETS], page
    assert len(list((site / "validations").rglob("*.html"))) > len([p for p in before if p.startswith("validations")])
    assert make_offline(site) == 0
