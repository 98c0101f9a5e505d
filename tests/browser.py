"""Headless Chromium for browser tests: the distribution's /usr/bin/chromium driven by Playwright (Playwright's
own browser download is not used), a local web server for a folder, and a page that cannot reach the network.

    with chromium() as browser, serve(site) as base:
        page = browser.new_page()
        left = keep_local(page)          # every non-local request is aborted and listed here
        page.goto(f"{base}/index.html")

A missing Chromium fails the test (it does not skip): ``scripts/install_chromium.sh`` installs it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = Path(os.environ.get("HISTCODE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
LOCAL_SCHEMES = {"data", "blob", "about", "file"}


def launch_chromium(playwright):
    """A launched headless Chromium (``playwright`` is a started ``sync_playwright()``); fails without one."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium is missing at {CHROMIUM}: run scripts/install_chromium.sh", pytrace=False)
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


@contextlib.contextmanager
def chromium() -> Iterator:
    """Playwright started, Chromium launched; both closed on exit."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # a dev dependency: pip install -e '.[dev]'
        pytest.fail(f"the playwright package is missing ({exc}): pip install -e '.[dev]'", pytrace=False)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            yield browser
        finally:
            browser.close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve ``root`` over http on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in LOCAL_SCHEMES or (parts.scheme in ("http", "https", "ws", "wss")
                                             and parts.hostname in LOCAL_HOSTS)


def keep_local(page) -> list[str]:
    """Abort every request of ``page`` that would leave the machine; returns the (growing) list of their URLs."""
    left: list[str] = []

    def _route(route) -> None:
        url = route.request.url
        if is_local(url):
            route.continue_()
        else:
            left.append(url)
            route.abort()

    page.route("**/*", _route)
    return left
