"""`histcode view`: the web viewer over a real workspace (the heads cohort: tiled, embedded, heads registered),
served by uvicorn and driven in the distribution's headless Chromium (Playwright): the cohort page, a slide's
Deep Zoom tiles and attention overlay checked in screenshot pixels, click-through similar-tile search, and
hostile requests answered 404."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from histcode.wsi.grid import grid_of
from tests.browser import chromium, keep_local

pytestmark = pytest.mark.browser


@pytest.fixture
def browser_page():
    """A page of the distribution's headless Chromium that cannot reach beyond this machine."""
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 850})
        left = keep_local(page)
        yield page
        assert not left, f"the viewer asked for something outside the machine: {left}"


@pytest.fixture(scope="module")
def viewer_url(headed_workspace, tmp_path_factory):
    from histcode.viewer import create_app
    from histcode.viewer.serving import background_server

    with background_server(create_app(headed_workspace, cache_dir=tmp_path_factory.mktemp("viewer-cache"))) as url:
        yield url


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _json(url: str) -> dict:
    status, body = _get(url)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


def _q(**params) -> str:
    return urllib.parse.urlencode(params)


def _slides(viewer_url) -> list[dict]:
    return _json(f"{viewer_url}/api/slides")["slides"]


def _tumour_slide(viewer_url) -> str:
    slides = _slides(viewer_url)
    return max((s for s in slides if s.get("tumor")), key=lambda s: s.get("p_tumor") or 0)["slide_id"]


def test_the_grid_maps_tiles_to_cells_and_points_to_tiles() -> None:
    xy = np.array([[512, 0], [768, 0], [512, 256], [1024, 512]])
    grid = grid_of(["a", "b", "c", "d"], xy, 256)
    assert grid.origin == (0, 0) and grid.shape == (3, 5)
    assert grid.cells.tolist() == [[0, 2], [0, 3], [1, 2], [2, 4]]
    assert grid.index_at(700, 10) == 0 and grid.index_at(768, 255.5) == 1 and grid.index_at(1100, 700) == 3
    assert grid.index_at(10, 10) is None and grid.index_at(1280, 512) is None  # glass, and just past the last tile
    shifted = grid_of(["a"], np.array([[300, 45]]), 256)
    assert shifted.origin == (44, 45) and shifted.cells.tolist() == [[0, 1]]


def test_the_cohort_page_lists_every_slide_with_predictions(viewer_url, headed_workspace, browser_page) -> None:
    from histcode.store.catalog import Catalog

    expected = {s["slide_id"] for s in Catalog.of(headed_workspace).slides()}
    page = browser_page
    page.goto(viewer_url + "/")
    page.wait_for_function("window.HISTCODE && window.HISTCODE.ready", timeout=120_000)
    shown = page.eval_on_selector_all("#slides tbody tr", "rows => rows.map(r => r.dataset.slide)")
    assert set(shown) == expected and len(shown) == len(expected)
    headers = page.eval_on_selector_all("#slides thead th", "ths => ths.map(t => t.textContent)")
    assert "p tumour" in headers
    p_col = headers.index("p tumour")
    values = page.eval_on_selector_all(f"#slides tbody tr td:nth-child({p_col + 1})", "tds => tds.map(t => t.textContent)")
    assert all(0 <= float(v) <= 1 for v in values)  # every slide predicted by the registered tumour head
    # sorting by p tumour puts the highest first after two clicks; the filter narrows the rows
    def loaded(action) -> None:  # sorting and filtering are answered by the server: wait for the new page
        before = page.evaluate("window.HISTCODE.loads")
        action()
        page.wait_for_function(f"window.HISTCODE.loads > {before}", timeout=30_000)

    loaded(lambda: page.click(f"#slides thead th:nth-child({p_col + 1})"))
    loaded(lambda: page.click(f"#slides thead th:nth-child({p_col + 1})"))
    first = page.eval_on_selector("#slides tbody tr td:nth-child(%d)" % (p_col + 1), "td => td.textContent")
    assert float(first) == max(float(v) for v in values)
    one = sorted(expected)[0]
    loaded(lambda: page.fill("#filter", one))
    assert page.eval_on_selector_all("#slides tbody tr", "rows => rows.map(r => r.dataset.slide)") == [one]


def _pixel(png: bytes, x: float, y: float) -> np.ndarray:
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)
    r, c = int(round(y)), int(round(x))
    return image[r - 2:r + 3, c - 2:c + 3].reshape(-1, 3).mean(axis=0)


def test_a_slide_page_shows_its_tiles_and_the_attention_over_them(viewer_url, browser_page) -> None:
    from histcode.viz.colours import tile_rgba

    sid = _tumour_slide(viewer_url)
    info = _json(f"{viewer_url}/api/slide?{_q(id=sid)}")
    page = browser_page
    tiles_served = []
    page.on("response", lambda r: tiles_served.append(r.status) if "/api/dz?" in r.url else None)
    page.goto(f"{viewer_url}/slide?{_q(id=sid)}")
    page.wait_for_function("window.HISTCODE && window.HISTCODE.ready", timeout=120_000)
    page.wait_for_load_state("networkidle")
    assert tiles_served and set(tiles_served) == {200}
    assert page.input_value("#layer") == "attention"
    # the tile with the most attention: where it is on screen, and what the overlay paints there
    status, png = _get(f"{viewer_url}/api/overlay?{_q(id=sid, layer='attention')}")
    assert status == 200
    overlay = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
    attention = next(o for o in info["overlays"] if o["name"] == "attention")
    rows, cols = attention["placement"]["rows"], attention["placement"]["cols"]
    assert overlay.shape[:2] == (rows, cols)
    r, c = np.unravel_index(np.argmax(overlay[..., 3]), overlay.shape[:2])
    size = attention["placement"]["tile_size"]
    ix = attention["placement"]["x"] * info["tile_source"]["width"] + (c + 0.5) * size
    iy = attention["placement"]["y"] * info["tile_source"]["width"] + (r + 0.5) * size
    at = page.evaluate("([x, y]) => { const p = window.HISTCODE.viewer.world.getItemAt(0).imageToViewerElementCoordinates("
                       "new OpenSeadragon.Point(x, y)); const b = document.getElementById('osd').getBoundingClientRect();"
                       " return [p.x + b.left, p.y + b.top]; }", [float(ix), float(iy)])
    with_overlay = _pixel(page.screenshot(), *at)
    assert page.eval_on_selector("#legend .bar", "e => getComputedStyle(e).backgroundImage").startswith("linear-gradient")
    page.select_option("#layer", "")
    page.wait_for_timeout(500)
    plain = _pixel(page.screenshot(), *at)
    assert plain.mean() < 250  # tissue was drawn from the Deep Zoom tiles there (not blank glass)
    rgba = overlay[r, c].astype(float)
    alpha = rgba[3] / 255 * 0.8  # the page's default opacity
    expected = alpha * rgba[:3] + (1 - alpha) * plain
    assert np.abs(with_overlay - plain).max() > 25  # the overlay changed what is seen
    assert np.abs(with_overlay - expected).max() < 30  # ... to the colour map's colour over the tissue
    top = tile_rgba(np.array([0.0, 1.0]), "sequential", (0.0, 1.0))[1]
    assert np.abs(rgba[:3] - top[:3]).max() < 40  # the most-attended tile has (nearly) the map's top colour


def test_a_click_on_a_tile_finds_its_neighbours_and_one_opens_its_slide(viewer_url, browser_page) -> None:
    sid = _tumour_slide(viewer_url)
    page = browser_page
    page.goto(f"{viewer_url}/slide?{_q(id=sid)}")
    page.wait_for_function("window.HISTCODE && window.HISTCODE.ready", timeout=120_000)
    info = page.evaluate("window.HISTCODE.info")
    grid = next(o for o in info["overlays"] if o["name"] == "grid")
    tiles = _json(f"{viewer_url}/api/slide?{_q(id=sid)}")["n_tiles"]
    assert tiles > 0 and grid
    page.select_option("#filter-column", "slide_id")  # a structured filter: slide_id != sid
    page.select_option("#filter-op", "ne")
    page.fill("#filter-value", sid)
    # the centre of a tile of the slide, found through the API from a point, clicked on screen
    xy = page.evaluate("""async () => {
        const s = window.HISTCODE, g = s.info.overlays.find(o => o.name === 'grid').placement;
        for (let r = 0; r < g.rows; r++) for (let c = 0; c < g.cols; c++) {
            const x = g.x * s.info.tile_source.width + (c + 0.5) * g.tile_size, y = g.y * s.info.tile_source.width + (r + 0.5) * g.tile_size;
            const res = await fetch('/api/tile-at?' + hc.q({id: s.slide, x, y}));
            if (res.ok) { const p = s.viewer.world.getItemAt(0).imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
                          const b = document.getElementById('osd').getBoundingClientRect(); return [p.x + b.left, p.y + b.top]; }
        }
        return null; }""")
    assert xy is not None
    page.mouse.click(*xy)
    page.wait_for_function("window.HISTCODE.neighbours > 0", timeout=60_000)
    cards = page.eval_on_selector_all("#neighbours a", "as => as.map(a => [a.dataset.slide, a.getAttribute('href')])")
    assert len(cards) == 8 and all(s != sid for s, _ in cards)  # the filter holds: other slides only
    page.wait_for_function("[...document.querySelectorAll('#neighbours img')].every(i => i.complete)", timeout=60_000)
    widths = page.eval_on_selector_all("#neighbours img", "imgs => imgs.map(i => i.naturalWidth)")
    assert all(w > 0 for w in widths)  # every neighbour's thumbnail was read from its slide
    other, href = cards[0]
    page.click("#neighbours a >> nth=0")
    page.wait_for_function("window.HISTCODE && window.HISTCODE.ready", timeout=120_000)
    assert page.evaluate("window.HISTCODE.slide") == other
    query = urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query)
    assert {"x", "y", "size"} <= set(query)
    # the viewer opened centred on that tile
    centre = page.evaluate("(() => { const v = window.HISTCODE.viewer; const c = v.viewport.getCenter(true);"
                           " const p = v.world.getItemAt(0).viewportToImageCoordinates(c); return [p.x, p.y]; })()")
    x, y, size = (float(query[k][0]) for k in ("x", "y", "size"))
    assert abs(centre[0] - (x + size / 2)) < size and abs(centre[1] - (y + size / 2)) < size
    assert page.eval_on_selector_all("#similar a", "as => as.length") > 0  # similar slides listed too


HOSTILE = ["../../etc/passwd", "x' OR '1'='1", "TCGA-XX-0000-01Z-00-DX1", "/etc/hosts", "", "%00", "C:\\Windows"]


def test_hostile_ids_and_addresses_get_404(viewer_url) -> None:
    sid = _tumour_slide(viewer_url)
    for bad in HOSTILE:
        for path in ("/slide", "/api/slide", "/api/thumbnail", "/api/dz", "/api/similar"):
            status, _ = _get(f"{viewer_url}{path}?{_q(id=bad, level=0, col=0, row=0)}")
            assert status == 404, (path, bad, status)
        assert _get(f"{viewer_url}/api/overlay?{_q(id=bad, layer='attention')}")[0] == 404
    levels = _json(f"{viewer_url}/api/slide?{_q(id=sid)}")["tile_source"]["maxLevel"]
    assert _get(f"{viewer_url}/api/dz?{_q(id=sid, level=levels, col=0, row=0)}")[0] == 200
    for level, col, row in ((levels + 1, 0, 0), (-1, 0, 0), (levels, 10_000, 0), (levels, 0, -1), (0, 1, 0)):
        assert _get(f"{viewer_url}/api/dz?{_q(id=sid, level=level, col=col, row=row)}")[0] == 404, (level, col, row)
    assert _get(f"{viewer_url}/api/dz?{_q(id=sid, level='x', col=0, row=0)}")[0] == 400
    assert _get(f"{viewer_url}/api/overlay?{_q(id=sid, layer='../../etc/passwd')}")[0] == 404
    assert _get(f"{viewer_url}/api/tile-image?{_q(tile='nope')}")[0] == 404
    assert _get(f"{viewer_url}/api/neighbours?{_q(tile='nope')}")[0] == 404
    assert _get(f"{viewer_url}/api/slides?{_q(view='fv-nope')}")[0] == 404
    assert _get(f"{viewer_url}/api/tile-at?{_q(id=sid, x=-5, y=-5)}")[0] == 404
    assert _get(f"{viewer_url}/static/../../histcode/viewer/app.py")[0] == 404
    assert _get(f"{viewer_url}/static/%2e%2e/app.py")[0] == 404
    status, body = _get(f"{viewer_url}/api/neighbours?" + _q(tile=_any_tile(viewer_url, sid), where="no_such_column = 1"))
    assert status == 400 and b"filter" in body


def _any_tile(viewer_url, sid) -> str:
    info = _json(f"{viewer_url}/api/slide?{_q(id=sid)}")
    g = next(o for o in info["overlays"] if o["name"] == "grid")["placement"]
    for r in range(g["rows"]):
        for c in range(g["cols"]):
            status, body = _get(f"{viewer_url}/api/tile-at?" + _q(id=sid, x=g["x"] * info["tile_source"]["width"] + (c + 0.5) * g["tile_size"],
                                                                 y=g["y"] * info["tile_source"]["width"] + (r + 0.5) * g["tile_size"]))
            if status == 200:
                return json.loads(body)["tile_id"]
    raise AssertionError("no tile found")


def test_the_label_gates_data_docs_are_served_offline_and_linked(viewer_url) -> None:
    status, page = _get(f"{viewer_url}/")
    assert status == 200 and b'href="/datadocs/index.html"' in page
    status, docs = _get(f"{viewer_url}/datadocs/index.html")
    assert status == 200 and b"static/vendor/" in docs and b"https://code.jquery.com" not in docs
    assert _get(f"{viewer_url}/datadocs/../../catalog.duckdb")[0] == 404
