"""Identity of tiling specs and tiles.

``spec_id`` hashes every field that changes which tiles exist, plus the tiler's code version, so a change of
parameters or of the tiling code yields new rows next to the old ones instead of silently mixing them.
``tile_id`` hashes the slide's content, the spec and the tile's level-0 square, so it is stable across reruns
and machines and changes whenever the pixels it names could.
"""

from __future__ import annotations

import hashlib

from histcode.config import TilingConfig, stable_hash

# Bump when a change to the tiling code changes which tiles a slide gets.
TILER_VERSION = "1"


def spec_payload(cfg: TilingConfig) -> dict:
    return {"tiler_version": TILER_VERSION, **cfg.spec_dict()}


def spec_id_of(cfg: TilingConfig) -> str:
    return "ts-" + stable_hash(spec_payload(cfg), length=12)


def tile_id_of(content_hash: str, spec_id: str, x: int, y: int, size: int) -> str:
    key = f"{content_hash}|{spec_id}|{x}|{y}|{size}".encode()
    return hashlib.sha256(key).hexdigest()[:24]
