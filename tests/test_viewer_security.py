"""Issue 31, the viewer's part: a viewer that is safe to share, tried against real servers over real HTTP.

Search filters are structured clauses (``histcode.viewer.filters``), so the raw-``where`` attack is refused at
once with a short reason and a filter names only allowed columns; a foreign ``Host`` is refused (DNS
rebinding) unless ``--allowed-host`` admits it; ``histcode view`` refuses a non-loopback bind without
``--public`` and then wants its token (or a proxy's header) on every route; and the viewer leaves a copied,
read-only workspace exactly as it was, its models found in the copy's own artifacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from histcode.viewer.serving import background_server, free_port
from histcode.workspace import Workspace

EVIL = "evil.example.com"
TOKEN = "test-token-0123456789abcdef"


def _get(url: str, headers: dict | None = None, timeout: float = 120) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _json(url: str, headers: dict | None = None) -> dict:
    status, _, body = _get(url, headers)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


def _q(*pairs, **params) -> str:
    return urllib.parse.urlencode([*pairs, *params.items()])


@pytest.fixture(scope="module")
def viewer(embedded_workspace, tmp_path_factory):
    from histcode.viewer import create_app

    with background_server(create_app(embedded_workspace, cache_dir=tmp_path_factory.mktemp("cache"))) as url:
        yield url


@pytest.fixture(scope="module")
def tiles(embedded_workspace):
    """The default view's tile table as rows (no vectors) and its vectors, by tile id."""
    from histcode.features.read import view_table
    from histcode.features.registry import load_view
    from histcode.store.catalog import Catalog
    from histcode.store.vectors import TILE_KIND

    ws = embedded_workspace
    view = load_view(Catalog.of(ws), None, ws.config().features.attribute_columns)
    table = view_table(ws, view, TILE_KIND).to_lance().to_table()
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    return table.drop_columns(["vector"]).to_pylist(), vectors


def _expected_distances(tiles, query: str, keep, k: int) -> np.ndarray:
    """Exact cosine distances of the k rows nearest to tile ``query`` among those ``keep(row)`` admits."""
    rows, vectors = tiles
    q = vectors[[r["tile_id"] for r in rows].index(query)]
    idx = [i for i, r in enumerate(rows) if keep(r) and r["tile_id"] != query]
    v = vectors[idx]
    d = 1 - (v @ q) / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))
    return np.sort(d)[:k]


# -- filters --------------------------------------------------------------------------------------------------------
def test_the_long_where_attack_is_refused_at_once_with_a_short_reason(viewer, tiles) -> None:
    tile = tiles[0][0]["tile_id"]
    attack = "length(repeat(slide_id, 80000)) > 0"
    started = time.perf_counter()
    status, _, body = _get(f"{viewer}/api/neighbours?" + _q(tile=tile, where=attack))
    took = time.perf_counter() - started
    assert status == 400 and took < 1.0, (status, took)
    error = json.loads(body)["error"]
    assert "where" in error and "slide_id__ne" in error and len(body) < 400
    for leaked in ("lance", "Lance", "_rowid", "/root", "/home", "site-packages", "datafusion", attack):
        assert leaked not in error
    sid = tiles[0][0]["slide_id"]
    assert _get(f"{viewer}/api/similar?" + _q(id=sid, where=attack))[0] == 400
    # a structured clause cannot carry the attack either: it is a quoted literal, and its length is capped
    status, _, body = _get(f"{viewer}/api/neighbours?" + _q(tile=tile, slide_id__eq=attack))
    assert status == 200 and json.loads(body)["hits"] == []
    started = time.perf_counter()
    status, _, body = _get(f"{viewer}/api/neighbours?" + _q(tile=tile, slide_id__eq="x" * 5000))
    assert status == 400 and "too long" in json.loads(body)["error"] and time.perf_counter() - started < 1.0
    many = [("x__ge", str(i)) for i in range(9)]
    status, _, body = _get(f"{viewer}/api/neighbours?" + _q(*many, tile=tile))
    assert status == 400 and "too many filter clauses" in json.loads(body)["error"]
    status, _, body = _get(f"{viewer}/api/neighbours?" + _q(tile=tile, slide_id__in=",".join(map(str, range(100)))))
    assert status == 400 and "at most 64 values" in json.loads(body)["error"]


def test_a_structured_filter_returns_the_right_hits(viewer, tiles) -> None:
    rows, _ = tiles
    query = rows[0]
    sid, tile = query["slide_id"], query["tile_id"]
    got = _json(f"{viewer}/api/neighbours?" + _q(tile=tile, k=10, slide_id__ne=sid))
    assert got["filter"] == [{"column": "slide_id", "op": "ne", "value": sid}]
    hits = got["hits"]
    assert len(hits) == 10 and all(h["slide_id"] != sid for h in hits)
    want = _expected_distances(tiles, tile, lambda r: r["slide_id"] != sid, 10)
    assert np.allclose([h["distance"] for h in hits], want, atol=1e-4)
    # two clauses, a JSON list: the hits come from those slides only, nearest first
    others = sorted({r["slide_id"] for r in rows} - {sid})[:2]
    hits = _json(f"{viewer}/api/neighbours?" + _q(tile=tile, k=5, slide_id__in=json.dumps(others),
                                                   x__ge=0))["hits"]
    assert hits and {h["slide_id"] for h in hits} <= set(others)
    want = _expected_distances(tiles, tile, lambda r: r["slide_id"] in others, 5)
    assert np.allclose([h["distance"] for h in hits], want, atol=1e-4)
    # a promoted slide attribute (features.attribute_columns)
    subtypes = sorted({r["subtype"] for r in rows if r.get("subtype")})
    assert subtypes, "the tiny cohort's tiles carry their slides' subtype"
    by_tile = {r["tile_id"]: r for r in rows}
    hits = _json(f"{viewer}/api/neighbours?" + _q(tile=tile, k=6, subtype__eq=subtypes[0]))["hits"]
    assert hits and all(by_tile[h["tile_id"]]["subtype"] == subtypes[0] for h in hits)
    hits = _json(f"{viewer}/api/neighbours?" + _q(tile=tile, k=50, subtype__isnull="true"))["hits"]
    assert all(by_tile[h["tile_id"]]["subtype"] is None for h in hits)
    # a quote is a character of the value, not the end of a literal
    assert _json(f"{viewer}/api/neighbours?" + _q(tile=tile, slide_id__eq="x' OR '1'='1"))["hits"] == []
    # similar slides take the same filters
    patient = query["patient_id"]
    similar = _json(f"{viewer}/api/similar?" + _q(id=sid, k=10, patient_id__ne=patient))["hits"]
    assert similar and all(h["patient_id"] != patient for h in similar)
    # what the page offers: the allowed columns with their types, never the vectors
    allowed = _json(f"{viewer}/api/filters")
    names = {c["name"]: c["type"] for c in allowed["tile"]["columns"]}
    assert names["slide_id"] == "string" and names["x"] == "integer" and "subtype" in names and "vector" not in names
    assert {"eq", "ne", "in", "isnull"} <= {o["op"] for o in allowed["tile"]["operators"]}
    assert "n_tiles" in {c["name"] for c in allowed["slide"]["columns"]}


def test_unknown_columns_operators_and_values_are_refused_by_name(viewer, tiles) -> None:
    tile = tiles[0][0]["tile_id"]
    for params, named in (({"vector__eq": "1"}, "'vector'"), ({"_rowid__eq": "1"}, "'_rowid'"),
                          ({"size__gt": "1"}, "'size'"), ({"slide_id__like": "%"}, "'like'"),
                          ({"x__eq": "abc"}, "integer"), ({"x__lt": "99999999999999999999"}, "integer"),
                          ({"slide_id__eq": "a\x00b"}, "control"), ({"subtype__isnull": "maybe"}, "true or false"),
                          ({"slide_id__in": "[1, [2]]"}, "array")):
        status, _, body = _get(f"{viewer}/api/neighbours?" + _q(tile=tile, **params))
        assert status == 400, (params, status, body[:200])
        error = json.loads(body)["error"]
        assert named in error and len(error) < 300, (params, error)
        assert "lance" not in error.lower() and "/" not in error.replace("/api", ""), error


def test_a_search_past_its_time_limit_is_answered_503(embedded_workspace, tiles, tmp_path) -> None:
    from histcode.viewer import create_app

    app = create_app(embedded_workspace, cache_dir=tmp_path / "cache", search_time_limit_s=0.001)
    with background_server(app) as url:
        status, _, body = _get(f"{url}/api/neighbours?" + _q(tile=tiles[0][0]["tile_id"], x__ge=0))
        assert status == 503 and "longer than 0.001 s" in json.loads(body)["error"]


# -- hosts ----------------------------------------------------------------------------------------------------------
def test_a_foreign_host_is_refused(viewer) -> None:
    port = urllib.parse.urlparse(viewer).port
    for path in ("/", "/api/slides", "/static/common.js", "/api/filters"):
        status, _, body = _get(viewer + path, {"Host": EVIL})
        assert status == 400, (path, status)
        assert EVIL in json.loads(body)["error"] and b"slide_id" not in body
        status, _, body = _get(viewer + path, {"Host": f"{EVIL}:{port}"})
        assert status == 400
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert _get(viewer + "/api/slides", {"Host": host})[0] == 200, host


@contextlib.contextmanager
def _cli_viewer(ws: Path, *args: str, env: dict | None = None, host: str = "127.0.0.1"):
    """`histcode view` in a process of its own on a free port; yields (base URL, printed lines)."""
    port = free_port()
    command = [sys.executable, "-m", "histcode", "--workspace", str(ws), "view", "--port", str(port),
               "--host", host, *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "COLUMNS": "250", **(env or {})})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"`histcode view` exited {process.returncode}: {''.join(lines)}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "`histcode view` did not start"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", lines
    finally:
        process.terminate()
        process.wait(30)
        reader.join(5)


def test_allowed_host_admits_a_name_and_only_that_name(embedded_workspace, tmp_path) -> None:
    env = {"HISTCODE_CACHE_DIR": str(tmp_path / "cache")}
    with _cli_viewer(embedded_workspace.root, "--allowed-host", EVIL, "--allowed-host", "*.lab.example.org",
                     env=env) as (url, lines):
        assert _get(url + "/api/slides", {"Host": EVIL})[0] == 200
        assert _get(url + "/api/slides", {"Host": "viewer.lab.example.org:8765"})[0] == 200
        assert _get(url + "/api/slides", {"Host": "lab.example.org.evil.example.net"})[0] == 400
        assert _get(url + "/api/slides", {"Host": "other.example.com"})[0] == 400
        assert _get(url + "/api/slides")[0] == 200
    printed = "".join(lines)
    assert "reachable from this machine only" in printed and EVIL in printed


# -- binding and tokens ---------------------------------------------------------------------------------------------
def test_a_non_loopback_bind_is_refused_without_public(embedded_workspace) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10", "viewer.example.org"):
        done = subprocess.run([sys.executable, "-m", "histcode", "--workspace", str(embedded_workspace.root), "view",
                               "--host", host, "--port", str(free_port())], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "COLUMNS": "250"})
        assert done.returncode == 2, (host, done.stdout, done.stderr)
        assert "--public" in done.stderr and "not a loopback address" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "histcode", "--workspace", str(embedded_workspace.root), "view",
                           "--token", "short"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "16 to 256" in done.stderr


def test_a_public_viewer_wants_its_token_on_every_route(embedded_workspace, tmp_path) -> None:
    env = {"HISTCODE_CACHE_DIR": str(tmp_path / "cache")}
    with _cli_viewer(embedded_workspace.root, "--public", env=env, host="0.0.0.0") as (url, lines):
        printed = "".join(lines)
        token = re.search(r"\?token=([A-Za-z0-9_-]+)", printed).group(1)
        assert "made for this run" in printed and "reachable from the network" in printed
        for path in ("/", "/api/slides", "/static/common.js", "/api/filters", "/slide?id=x"):
            status, headers, body = _get(url + path)
            assert status == 401, (path, status)
            assert "token" in json.loads(body)["error"] and "Bearer" in headers.get("www-authenticate", "")
        assert _get(url + "/api/slides?token=wrong-token-xxxxxxxxxxxx")[0] == 403
        assert _get(url + "/api/slides", {"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"})[0] == 403
        status, headers, _ = _get(f"{url}/?token={token}")
        assert status == 200
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
        jar = cookie.split(";")[0]
        assert _get(url + "/api/slides", {"Cookie": jar})[0] == 200  # the page's own requests carry the cookie
        assert _get(url + "/static/common.js", {"Cookie": jar})[0] == 200
        assert _get(url + "/api/slides", {"Authorization": f"Bearer {token}"})[0] == 200
        assert _get(f"{url}/api/slides?token={token}", {"Host": EVIL})[0] == 400  # the token does not lift the Host check
    # a given token (here from the environment), and a proxy's header instead of a token
    with _cli_viewer(embedded_workspace.root, "--public", env={**env, "HISTCODE_VIEW_TOKEN": TOKEN},
                     host="0.0.0.0") as (url, lines):
        assert "made for this run" not in "".join(lines)
        assert _get(url + "/api/slides")[0] == 401
        assert _get(f"{url}/api/slides?token={TOKEN}")[0] == 200
    with _cli_viewer(embedded_workspace.root, "--auth-header", "X-Forwarded-User", env=env) as (url, lines):
        status, _, body = _get(url + "/api/slides")
        assert status == 401 and "x-forwarded-user" in json.loads(body)["error"]
        assert _get(url + "/api/slides", {"X-Forwarded-User": ""})[0] == 401
        assert _get(url + "/api/slides", {"X-Forwarded-User": "alice@lab"})[0] == 200


# -- a read-only viewer ---------------------------------------------------------------------------------------------
def _manifest(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: size and mtime, and the bytes' digest of the stores."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        key = str(p.relative_to(root))
        if p.is_file() and (p.suffix in (".db", ".duckdb") or st.st_size < 1_000_000):
            out[key] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[key] = (st.st_size if p.is_file() else None, st.st_mtime_ns)
    return out


def _chmod_tree(root: Path, writable: bool) -> None:
    w = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode
        p.chmod((mode | stat.S_IWUSR) if writable else (mode & ~w))


def test_the_viewer_leaves_a_copied_read_only_workspace_as_it_was(headed_workspace, tmp_path) -> None:
    from histcode.tracking import Tracker

    # a workspace copied twice: the first copy was used (a command relocated its store) and is gone, so the
    # second copy's store names artifacts in a folder that no longer exists
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(headed_workspace.root, first)
    Tracker(Workspace(first)).client  # noqa: B018 -- a writing command relocates the store in place
    shutil.copytree(first, second)
    shutil.rmtree(first)
    ws = Workspace(second)
    with contextlib.closing(sqlite3.connect(ws.mlruns_dir / "mlflow.db")) as con:
        locations = [r[0] for r in con.execute("SELECT artifact_location FROM logged_models").fetchall()]
    assert locations and all(first.resolve().as_uri() in loc for loc in locations)  # into the folder that is gone
    before = _manifest(second)
    _chmod_tree(second, writable=False)
    try:
        env = {"HISTCODE_CACHE_DIR": str(tmp_path / "cache")}
        with _cli_viewer(second, env=env) as (url, lines):
            slides = _json(url + "/api/slides")["slides"]
            assert slides
            sid = max((s for s in slides if s.get("tumor")), key=lambda s: s.get("p_tumor") or 0)["slide_id"]
            assert _get(f"{url}/?{_q()}")[0] == 200 and _get(f"{url}/slide?{_q(id=sid)}")[0] == 200
            info = _json(f"{url}/api/slide?{_q(id=sid)}")
            names = {o["name"] for o in info["overlays"]}
            assert "attention" in names, names  # the heads loaded: from this copy's artifacts, the first copy is gone
            assert _get(f"{url}/api/overlay?{_q(id=sid, layer='attention')}")[0] == 200
            assert _get(f"{url}/api/thumbnail?{_q(id=sid)}")[0] == 200
            tile = _any_tile(url, sid, info)
            assert _json(f"{url}/api/neighbours?{_q(tile=tile, slide_id__ne=sid)}")["hits"]
            assert _json(f"{url}/api/similar?{_q(id=sid)}")["hits"]
            assert _json(url + "/api/slides")["view"]  # the default view, found through the read-only registry
    finally:
        _chmod_tree(second, writable=True)
    after = _manifest(second)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


def _any_tile(url: str, sid: str, info: dict) -> str:
    grid = next(o for o in info["overlays"] if o["name"] == "grid")["placement"]
    x0, y0, size = (grid["x"] * info["tile_source"]["width"], grid["y"] * info["tile_source"]["width"],
                    grid["tile_size"])
    for r in range(grid["rows"]):
        for c in range(grid["cols"]):
            status, _, body = _get(f"{url}/api/tile-at?{_q(id=sid, x=x0 + (c + 0.5) * size, y=y0 + (r + 0.5) * size)}")
            if status == 200:
                return json.loads(body)["tile_id"]
    raise AssertionError(f"no tile of slide {sid} found")


def test_a_read_only_tracker_reads_a_copy_and_opens_no_run(embedded_workspace, tmp_path) -> None:
    from histcode.tracking import ReadOnlyTracker, Tracker

    copy = tmp_path / "copy"
    shutil.copytree(embedded_workspace.root, copy)
    db = copy / "mlruns" / "mlflow.db"
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    tracker = Tracker(Workspace(copy), read_only=True)
    experiments = tracker.client.search_experiments()
    assert experiments and all(copy.resolve().as_uri() in e.artifact_location for e in experiments)
    assert tracker.uri != Workspace(copy).mlflow_uri and str(copy) not in tracker.uri  # a private copy, elsewhere
    with pytest.raises(ReadOnlyTracker):
        tracker.start_run("heads", "nothing")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest
    # a store changed by a command is read again
    writer = Tracker(Workspace(copy))
    writer.experiment_id("written-later")
    time.sleep(1.1)
    assert "written-later" in {e.name for e in tracker.client.search_experiments()}
    # no store: nothing is created, and the reader says so
    empty = Workspace(tmp_path / "empty")
    reader = Tracker(empty, read_only=True)
    with pytest.raises(LookupError):
        reader.client  # noqa: B018
    assert not (tmp_path / "empty").exists()
