"""Screenshots of the viewer for the README and docs/viewer.md: the cohort page, and a tumour slide with its attention overlay and
the neighbours of a clicked tile.

    python scripts/viewer_screenshots.py [--workspace WS] [--out docs/screenshots]

Serves the viewer over a workspace the demo made and drives the distribution's headless Chromium.
"""

from __future__ import annotations

import argparse
import logging
import sys
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("screenshots")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from histcode.tracking import telemetry_off
    from histcode.viewer import create_app
    from histcode.viewer.serving import background_server
    from histcode.workspace import Workspace

    telemetry_off()
    app = create_app(Workspace.resolve(args.workspace), warm=False)

    with background_server(app) as base:
        shoot(app, base, args.out)


def shoot(app, base: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    from tests.browser import launch_chromium  # the tests' Chromium and its flags

    data = app.state.data
    predictions = data.predictions()
    slide = max(predictions, key=lambda sid: (data.mask_auc(sid) or 0) + predictions[sid].get("p_tumor", 0))
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1360, "height": 820})
        page.goto(base + "/")
        page.wait_for_function("window.HISTCODE && window.HISTCODE.ready")
        page.wait_for_function("[...document.querySelectorAll('img.thumb')].slice(0, 12).every(i => i.complete)")
        page.screenshot(path=str(out / "cohort.png"))
        page.goto(base + "/slide?" + urllib.parse.urlencode({"id": slide}))
        page.wait_for_function("window.HISTCODE && window.HISTCODE.ready")
        page.select_option("#filter-column", "slide_id")  # a structured filter: slide_id != slide
        page.select_option("#filter-op", "ne")
        page.fill("#filter-value", slide)
        scores = data.layers(slide)["attention"]
        top = int(scores.scores.argmax())
        x, y = (float(v) + scores.grid.size / 2 for v in scores.grid.xy[top])
        at = page.evaluate("([x, y]) => { const p = window.HISTCODE.viewer.world.getItemAt(0).imageToViewerElementCoordinates("
                           "new OpenSeadragon.Point(x, y)); const b = document.getElementById('osd').getBoundingClientRect();"
                           " return [p.x + b.left, p.y + b.top]; }", [x, y])
        page.mouse.click(*at)
        page.wait_for_function("window.HISTCODE.neighbours > 0")
        page.wait_for_function("[...document.querySelectorAll('aside img')].every(i => i.complete)")
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(out / "slide.jpg"), type="jpeg", quality=85)
        browser.close()
    log.info("wrote %s and %s (slide %s)", out / "cohort.png", out / "slide.jpg", slide)


if __name__ == "__main__":
    main()
