"""The demo's done-stamp fingerprint: what changes it (the whole demo round trip is in tests/test_cli.py)."""

from __future__ import annotations

import os
from pathlib import Path

from histcode.apps.done_stamp import STAMP, fingerprint, read_stamp, write_stamp

STORES = {"mlflow": "sqlite:///x/mlflow.db", "lancedb": "x/data/lancedb"}


def _workspace(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "ws"
    for folder in ("data", "mlruns", "metrics", "outputs/logs"):
        (root / folder).mkdir(parents=True)
    (root / "data" / "catalog.duckdb").write_bytes(b"catalog")
    outside = tmp_path / "expression.tsv"  # an input the config names, outside the workspace
    outside.write_text("gene\ts1\n")
    return root, outside


def test_the_fingerprint_follows_state_inputs_links_and_stores(tmp_path) -> None:
    root, outside = _workspace(tmp_path)
    base = lambda **kw: fingerprint(root, {"a": 1}, kw.get("inputs", [outside]), kw.get("stores", STORES))  # noqa: E731
    first = base()
    assert base() == first  # deterministic
    (root / "outputs" / "logs" / "server.log").write_text("noise")  # server logs are not state
    write_stamp(root, first, "summary")  # nor is the stamp itself
    assert base() == first and read_stamp(root, first)["summary"] == "summary"
    assert fingerprint(root, {"a": 2}, [outside], STORES) != first  # the config
    assert base(stores={**STORES, "lancedb": "s3://bucket/lancedb"}) != first  # where the vectors live
    outside.write_text("gene\ts1\ts2\n")  # an input outside the workspace
    second = base()
    assert second != first and read_stamp(root, second) is None
    linked = tmp_path / "elsewhere"  # a store folder that is a link to another disk
    linked.mkdir()
    (linked / "fragment.lance").write_bytes(b"v1")
    os.symlink(linked, root / "data" / "lancedb")
    third = base()
    (linked / "fragment.lance").write_bytes(b"v2, longer")
    assert base() != third  # a change behind the link is seen
    os.symlink(root / "data", root / "data" / "loop")  # a link back into a walked folder ends the walk there
    assert isinstance(base(), str)
    (root / "outputs" / STAMP).unlink()
    assert read_stamp(root, base()) is None
