"""The slide viewer's speed: start-up and the cohort page at ten thousand slides, Deep Zoom tiles cold and warm,
and how long a slide page takes to become interactive.

    python benchmarks/viewer.py [--cohort 10000] [--workspace WS] [--slides 5] [--repeat 3] [--skip-demo]

First a synthetic cohort: a workspace whose catalog holds ``--cohort`` slides (rows only: their files are three small
pyramidal TIFFs written here, shared), each with a tiling, labels and stored predictions (tumour, two subtypes and
twenty DE genes, as `histcode heads` and `histcode predict` store them), a feature view row and nothing else. On it:
  - start-up: `histcode view` as a user starts it (a new process), seconds until the cohort's first page answers,
    beside the same on the demo workspace (a start-up that does not grow with the cohort is what counts);
  - the cohort page in headless Chromium: navigation to interactive (``HISTCODE.ready``: the first page of rows
    drawn), first and repeat visits; then, two seconds later, a filter typed, cleared and a sort by p tumour, each
    from the action to the new rows drawn; and the same requests through HTTP alone (p50 of 20).
Goals (issue 28): start-up <= 3 s, the cohort page interactive <= 1 s and a filter <= 300 ms at 10,000 slides.

Then, over a workspace that ``histcode demo`` made (``--workspace``, default this checkout's; skipped with
``--skip-demo`` or when there is none), ``histcode view``'s app served in this process:
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
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
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


GENES = [f"GENE{i:02d}" for i in range(20)]


def synthetic_workspace(root: Path, n: int, seed: int = 0):
    """A workspace whose catalog holds ``n`` slides (three real small slide files shared among them), with tilings,
    labels, stored predictions and one feature view: what the cohort page reads, at any size."""
    import numpy as np
    import pandas as pd

    from histcode.demo.tiff_writer import write_aperio_svs
    from histcode.ingest.inspect import file_sha256
    from histcode.store.catalog import Catalog
    from histcode.store.records import utcnow
    from histcode.workspace import Workspace

    rng = np.random.default_rng(seed)
    ws = Workspace(root)
    (root / "slides").mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(3):
        yy, xx = np.mgrid[0:1536, 0:2048]
        image = np.stack([200 - 40 * np.sin(xx / (60 + 20 * i)) * np.cos(yy / 80), 120 + 50 * np.cos(xx / 90),
                          190 + 30 * np.sin(yy / 50)], axis=-1).clip(0, 255).astype(np.uint8)
        path = write_aperio_svs(root / "slides" / f"real-{i}.svs", image, 0.5, 20, 80, f"real-{i}.svs")
        files.append((f"slides/real-{i}.svs", file_sha256(path)))
    catalog = Catalog.of(ws)
    catalog.upgrade()
    ids = [f"SYN-{i:05d}-01Z-00-DX1" for i in range(n)]
    now = utcnow()
    which = rng.integers(0, len(files), n)
    tumour = rng.random(n) < 0.6
    slides = pd.DataFrame({
        "slide_id": ids, "patient_id": [f"SYN-{i // 2:05d}" for i in range(n)],
        "path": [files[w][0] for w in which], "content_hash": [files[w][1] for w in which], "hash_kind": "sha256",
        "vendor": "aperio", "width": 2048, "height": 1536, "level_count": 2, "mpp_x": 0.5, "mpp_y": 0.5,
        "mpp_source": "openslide", "cohort": np.where(rng.random(n) < 0.8, "tcga-luad-lusc", "predict"),
        "status": "ok", "ingested_at": now, "updated_at": now})
    tilings = pd.DataFrame({"slide_id": ids, "spec_id": "spec-bench", "content_hash": slides.content_hash,
                            "status": "ok", "n_tiles": rng.integers(200, 9000, n), "created_at": now})
    labels = pd.DataFrame({"slide_id": ids, "patient_id": slides.patient_id, "tumor": tumour,
                           "subtype": np.where(rng.random(n) < 0.5, "LUAD", "LUSC"), "source": "bench"})
    p = rng.random(n)
    rows = [pd.DataFrame({"slide_id": ids, "task": "tumor", "model": "histcode-tumor-head", "version": 3,
                          "output": "p_tumor", "value": p, "call": np.where(p >= 0.5, "tumor", "normal")})]
    luad = rng.random(n)
    for name, value in (("p_luad", luad), ("p_lusc", 1 - luad)):
        rows.append(pd.DataFrame({"slide_id": ids, "task": "subtype", "model": "histcode-subtype-head", "version": 2,
                                  "output": name, "value": value, "call": np.where(luad >= 0.5, "LUAD", "LUSC")}))
    for gene in GENES:
        rows.append(pd.DataFrame({"slide_id": ids, "task": "de", "model": "histcode-de-head", "version": 2,
                                  "output": f"de_{gene}", "value": rng.normal(0, 1, n),
                                  "call": rng.choice(["up", "down", "unchanged", "not_classified"], n)}))
    preds = pd.concat(rows, ignore_index=True)
    preds["source"] = np.where(np.isin(preds.slide_id, np.array(ids)[slides.cohort == "predict"]), "predict", "cv")
    preds = preds.assign(aggregator="attention", view_id="fv-bench", stale=False, predicted_at=now)
    view = pd.DataFrame([{"view_id": "fv-bench", "kind": k, "encoder_uri": "models:/histcode-encoder/1",
                          "model_name": "histcode-encoder", "model_version": "1", "method": "adco", "dim": 512,
                          "metric": "cosine", "spec_id": "spec-bench", "image_px": 224,
                          "lance_table": f"{k}_emb__fv_bench", "status": "ok", "created_at": now, "updated_at": now}
                         for k in ("tile", "slide")])
    with catalog.transaction() as con:
        for table, frame in (("slides", slides), ("tilings", tilings), ("slide_labels", labels),
                             ("predictions", preds), ("feature_views", view)):
            con.register("_frame", frame)
            cols = ", ".join(f'"{c}"' for c in frame.columns)
            con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _frame")
            con.unregister("_frame")
        con.execute("INSERT INTO cohorts VALUES ('tcga-luad-lusc', 'training', now()), ('predict', 'inference', now())")
    return ws, len(preds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_viewer(ws_root: Path, env: dict) -> tuple[subprocess.Popen, str, float]:
    """`histcode view` in a new process: (the process, its address, seconds until /api/slides answered)."""
    port = _free_port()
    cli = Path(sys.executable).with_name("histcode")
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(cli), "--workspace", str(ws_root), "view", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    base = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"histcode view exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(base + "/api/slides", timeout=30) as r:
                r.read()
            return proc, base, time.perf_counter() - t0
        except OSError:
            time.sleep(0.02)


def _http_ms(base: str, path: str, repeat: int = 20) -> float:
    con = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=60)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        con.request("GET", path)
        resp = con.getresponse()
        resp.read()
        assert resp.status == 200, (path, resp.status)
        times.append((time.perf_counter() - t0) * 1000)
    con.close()
    return float(np.median(times))


def cohort_benchmark(args, demo_root: Path | None) -> None:
    from playwright.sync_api import sync_playwright

    from tests.browser import launch_chromium

    with tempfile.TemporaryDirectory(prefix="histcode-viewer-bench-") as tmp:
        t0 = time.perf_counter()
        ws, n_rows = synthetic_workspace(Path(tmp) / "ws", args.cohort)
        print(f"synthetic cohort: {args.cohort} slides, {n_rows} stored prediction rows, written in "
              f"{time.perf_counter() - t0:.1f} s")
        env = {**os.environ, "HISTCODE_CACHE_DIR": str(Path(tmp) / "cache")}
        starts = {}
        for name, root in (("synthetic", ws.root), ("demo", demo_root)):
            if root is None:
                continue
            proc, base, seconds = start_viewer(root, env)
            starts[name] = seconds
            if name == "demo":
                proc.terminate()
                proc.wait(30)
                continue
            try:
                page_ms = {
                    "first page": _http_ms(base, "/api/slides"),
                    "filter 'syn-0042'": _http_ms(base, "/api/slides?q=syn-0042"),
                    "filter a call 'down'": _http_ms(base, "/api/slides?q=down"),
                    "sort by p tumour": _http_ms(base, "/api/slides?sort=p_tumor&order=desc"),
                    "sort by a gene": _http_ms(base, "/api/slides?sort=de_GENE07"),
                    "last page": _http_ms(base, f"/api/slides?offset={args.cohort - 50}"),
                    "thumbnail (cached)": _http_ms(base, "/api/thumbnail?id=SYN-00001-01Z-00-DX1"),
                }
                with sync_playwright() as p:
                    browser = launch_chromium(p)
                    page = browser.new_page(viewport={"width": 1400, "height": 850})

                    def visit() -> float:
                        t = time.perf_counter()
                        page.goto(base + "/")
                        page.wait_for_function("window.HISTCODE && window.HISTCODE.ready", timeout=60_000)
                        return time.perf_counter() - t

                    def action(do) -> float:
                        before = page.evaluate("window.HISTCODE.loads")
                        t = time.perf_counter()
                        do()
                        page.wait_for_function(f"window.HISTCODE.loads > {before}", timeout=60_000)
                        return time.perf_counter() - t

                    visits = [visit() for _ in range(3)]
                    page.wait_for_timeout(2000)  # a user reads the page before typing
                    typed = action(lambda: page.fill("#filter", "SYN-0042"))
                    cleared = action(lambda: page.fill("#filter", ""))
                    sort = action(lambda: page.click("#slides thead th[data-key=p_tumor]"))
                    rows = page.eval_on_selector_all("#slides tbody tr", "rs => rs.length")
                    browser.close()
            finally:
                proc.terminate()
                proc.wait(30)
        said = ", ".join(f"{k} {v:.2f} s" for k, v in starts.items())
        ratio = f" (synthetic : demo {starts['synthetic'] / starts['demo']:.2f} : 1)" if "demo" in starts else ""
        print(f"start-up, `histcode view` to the first page answered: {said}{ratio}")
        print(f"cohort page in Chromium ({rows} rows a page): interactive first {visits[0]:.2f} s, again "
              f"{min(visits[1:]):.2f} s; filter typed {typed * 1000:.0f} ms (incl. the page's 80 ms debounce), "
              f"cleared {cleared * 1000:.0f} ms; sort by p tumour {sort * 1000:.0f} ms")
        print("HTTP alone, p50 of 20: " + "; ".join(f"{k} {v:.1f} ms" for k, v in page_ms.items()))
        met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
        print(f"goals at {args.cohort} slides: start-up <= 3 s: {starts['synthetic']:.2f} s {met(starts['synthetic'] <= 3)}; "
              f"interactive <= 1 s: {visits[0]:.2f} s {met(visits[0] <= 1)}; filter <= 300 ms: {typed * 1000:.0f} ms "
              f"{met(typed <= 0.3)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=int, default=10_000, help="slides of the synthetic cohort (0: skip it)")
    parser.add_argument("--workspace", type=Path, default=None, help="a workspace the demo made (default: this checkout's)")
    parser.add_argument("--skip-demo", action="store_true", help="only the synthetic cohort")
    parser.add_argument("--slides", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="slide-page visits per slide after the first")
    args = parser.parse_args()

    from histcode.tracking import telemetry_off
    from histcode.workspace import Workspace

    telemetry_off()
    ws = None if args.skip_demo else Workspace.resolve(args.workspace)
    if ws is not None and not ws.catalog_path.is_file():
        print(f"no demo workspace at {ws.root} (run `histcode demo`): its measures are skipped")
        ws = None
    if args.cohort:
        cohort_benchmark(args, ws.root if ws is not None else None)
    if ws is None:
        return
    from histcode.viewer import create_app
    from histcode.viewer.serving import background_server

    with tempfile.TemporaryDirectory(prefix="histcode-viewer-cache-") as cache:
        app = create_app(ws, cache_dir=Path(cache))
        with background_server(app) as base:
            report(app, base, args)


def report(app, base: str, args) -> None:
    port = int(base.rsplit(":", 1)[1])
    data, tiles = app.state.data, app.state.tiles
    slides = data.catalog.slides(status="ok")[: args.slides]
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

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 850})

        def visit(url: str) -> float:
            t0 = time.perf_counter()
            page.goto(url)
            page.wait_for_function("window.HISTCODE && window.HISTCODE.ready", timeout=120_000)
            return time.perf_counter() - t0

        cohort = [visit(base + "/") for _ in range(2)]
        print(f"cohort page interactive: first {cohort[0]:.2f} s, again {cohort[1]:.2f} s "
              f"({len(data.catalog.slides())} slides)")
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
