"""The slide viewer's speed: Deep Zoom tiles cold and warm, and how long a slide page takes to become interactive.

    python benchmarks/viewer.py [--workspace WS] [--slides 5] [--repeat 3]

Serves ``histcode view``'s app (uvicorn, in this process) over a workspace that ``histcode demo`` made, then:
  - Deep Zoom tiles: every tile of the three deepest levels of ``--slides`` slides, over one keep-alive HTTP
    connection, first request (cold: read from the slide, encoded, kept) and again (warm: from the cache);
    p50 / p95 / max ms per tile, the rendered JPEG's size;
  - slide pages in headless Chromium (the distribution's, as the tests use it): seconds from navigation to
    interactive (the page's ``HISTCODE.ready``: the slide opened in OpenSeadragon, its predictions shown and the
    attention overlay loaded), first visit and a repeat visit, per slide, and the cohort page's time too.
Goals (issue 15): a warm Deep Zoom tile <= 50 ms, a slide page interactive <= 2 s.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



def _tile_times(port: int, addresses: list[str]) -> tuple[np.ndarray, list[int]]:
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times, sizes = [], []
    for path in addresses:
        t0 = time.perf_counter()
        con.request("GET", path)
        resp = con.getresponse()
        body = resp.read()
        times.append((time.perf_counter() - t0) * 1000)
        assert resp.status == 200, (path, resp.status)
        sizes.append(len(body))
    con.close()
    return np.array(times), sizes


def _stats(ms: np.ndarray) -> str:
    return f"p50 {np.percentile(ms, 50):6.1f}  p95 {np.percentile(ms, 95):6.1f}  max {ms.max():6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=None, help="a workspace the demo made (default: this checkout's)")
    parser.add_argument("--slides", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="slide-page visits per slide after the first")
    args = parser.parse_args()

    from histcode.tracking import telemetry_off
    from histcode.workspace import Workspace

    telemetry_off()
    ws = Workspace.resolve(args.workspace)
    from histcode.viewer import create_app
    from histcode.viewer.serving import background_server

    app = create_app(ws)
    with background_server(app) as base:
        report(app, base, args)


def report(app, base: str, args) -> None:
    port = int(base.rsplit(":", 1)[1])
    data, tiles = app.state.data, app.state.tiles
    slides = [s for s in data.slides().values() if s["status"] == "ok"][: args.slides]
    addresses = []
    import openslide
    from openslide.deepzoom import DeepZoomGenerator  # the same pyramid the app serves, for its tile counts

    for s in slides:
        pyramid = tiles.pyramid(s["path"])
        with openslide.open_slide(s["path"]) as osr:
            dz = DeepZoomGenerator(osr, pyramid.tile_size, pyramid.overlap)
            for level in range(max(0, dz.level_count - 3), dz.level_count):
                cols, rows = dz.level_tiles[level]
                addresses += [f"/api/dz?{urllib.parse.urlencode({'id': s['slide_id'], 'level': level, 'col': c, 'row': r})}"
                              for c in range(cols) for r in range(rows)]
    cold, sizes = _tile_times(port, addresses)
    warm, _ = _tile_times(port, addresses)
    print(f"Deep Zoom tiles ({len(addresses)} tiles of {len(slides)} slides, three deepest levels, "
          f"{np.mean(sizes) / 1024:.1f} KiB each):")
    print(f"  cold (read, encode)  {_stats(cold)}")
    print(f"  warm (cached)        {_stats(warm)}   cold : warm (p50) {np.median(cold) / np.median(warm):.0f} : 1")

    from playwright.sync_api import sync_playwright

    from tests.browser import launch_chromium  # the tests' Chromium and its flags

    for slide_id in data.predictions():  # what the app's warm-up thread does at start-up
        data.layers(slide_id)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 850})

        def visit(url: str) -> float:
            t0 = time.perf_counter()
            page.goto(url)
            page.wait_for_function("window.HISTCODE && window.HISTCODE.ready", timeout=120_000)
            return time.perf_counter() - t0

        cohort = [visit(base + "/") for _ in range(2)]
        print(f"cohort page interactive: first {cohort[0]:.2f} s, again {cohort[1]:.2f} s ({len(data.slides())} slides)")
        firsts, repeats = [], []
        for s in slides:
            url = base + "/slide?" + urllib.parse.urlencode({"id": s["slide_id"]})
            firsts.append(visit(url))
            repeats += [visit(url) for _ in range(args.repeat)]
        browser.close()
    print(f"slide page interactive ({len(slides)} slides): first visit median {np.median(firsts):.2f} s "
          f"(max {max(firsts):.2f}); repeat visits median {np.median(repeats):.2f} s (max {max(repeats):.2f})")
    print(f"goals: warm tile <= 50 ms: p50 {np.median(warm):.1f} ms {'met' if np.median(warm) <= 50 else 'NOT met'}; "
          f"slide page <= 2 s: first visits max {max(firsts):.2f} s {'met' if max(firsts) <= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
