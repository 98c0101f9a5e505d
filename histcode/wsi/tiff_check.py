"""Structural check of a TIFF file: is every directory and every tile/strip inside the file?

OpenSlide reports a truncated TIFF as "not a recognised format" (or fails later, at read time). Walking the
directory chain and the tile extents tells the user what is actually wrong: where the file ends and where
its data should have continued. Handles classic TIFF and BigTIFF, both byte orders.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

TILE_OFFSETS, TILE_BYTE_COUNTS, STRIP_OFFSETS, STRIP_BYTE_COUNTS, TILE_WIDTH = 324, 325, 273, 279, 322
TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
TYPE_FORMATS = {3: "H", 4: "I", 13: "I", 16: "Q"}
MAX_IFDS = 10_000


def is_tiff(head: bytes) -> bool:
    return head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class _Reader:
    def __init__(self, data: memoryview, order: str, big: bool) -> None:
        self.data, self.order, self.big = data, order, big

    def unpack(self, fmt: str, offset: int) -> tuple:
        return struct.unpack_from(self.order + fmt, self.data, offset)


def _values(r: _Reader, typ: int, count: int, field: int) -> list[int] | None:
    """The integer array of a tag whose value field starts at ``field``; None if it lies past the end."""
    fmt = TYPE_FORMATS.get(typ)
    if fmt is None:
        return []
    size = TYPE_SIZES[typ] * count
    inline = 8 if r.big else 4
    offset = field if size <= inline else r.unpack("Q" if r.big else "I", field)[0]
    if offset + size > len(r.data):
        return None
    return list(r.unpack(f"{count}{fmt}", offset))


@dataclass(frozen=True)
class TiffCheck:
    problem: str | None  # why the file is truncated or malformed; None when its structure is whole
    tiled: bool  # at least one directory is tiled (OpenSlide reads tiled, pyramidal TIFFs only)


def check_tiff(path: Path) -> TiffCheck | None:
    """Walk the directory chain and tile tables of a TIFF (memory-mapped); None if the file is not a TIFF."""
    with path.open("rb") as fh:
        if not is_tiff(fh.read(4)):
            return None
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            problem, tiled = _walk(view)
    return TiffCheck(problem, tiled)


def _walk(data: memoryview) -> tuple[str | None, bool]:
    size = len(data)
    head = bytes(data[:4])
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")
    r = _Reader(data, order, big)
    if size < (16 if big else 8):
        return f"truncated: {size} bytes, shorter than a TIFF header", False
    ifd = r.unpack("Q", 8)[0] if big else r.unpack("I", 4)[0]
    entry, count_fmt, count_size, next_size = (20, "Q", 8, 8) if big else (12, "H", 2, 4)
    seen, tiled_any, n = set(), False, 0
    while ifd:
        if ifd in seen or n >= MAX_IFDS:
            return f"malformed: directory chain loops at byte {ifd}", tiled_any
        seen.add(ifd)
        n += 1
        if ifd + count_size > size:
            return f"truncated: directory {n} should start at byte {ifd} but the file has {size} bytes", tiled_any
        count = r.unpack(count_fmt, ifd)[0]
        end = ifd + count_size + count * entry + next_size
        if end > size:
            return f"truncated: directory {n} ends at byte {end} but the file has {size} bytes", tiled_any
        tags = {}
        for i in range(count):
            base = ifd + count_size + i * entry
            tag, typ = r.unpack("HH", base)
            cnt = r.unpack("Q" if big else "I", base + 4)[0]
            tags[tag] = (typ, cnt, base + (12 if big else 8))
        tiled_any |= TILE_WIDTH in tags
        for off_tag, cnt_tag in ((TILE_OFFSETS, TILE_BYTE_COUNTS), (STRIP_OFFSETS, STRIP_BYTE_COUNTS)):
            if off_tag in tags and cnt_tag in tags:
                offsets = _values(r, *tags[off_tag])
                counts = _values(r, *tags[cnt_tag])
                if offsets is None or counts is None:
                    return f"truncated: the tile table of directory {n} lies past the end of the file ({size} bytes)", tiled_any
                last = max((o + c for o, c in zip(offsets, counts)), default=0)
                if last > size:
                    return f"truncated: image data of directory {n} runs to byte {last} but the file has {size} bytes", tiled_any
        ifd = r.unpack("Q" if big else "I", end - next_size)[0]
    return None, tiled_any
