"""One imported file checked against its slide: the patch grid it was cut on, its vectors and level-0 corners.

The grid of a file is what makes its patches comparable with another file's (the spec of the imported view):
for TRIDENT the patch side at the target magnification, that magnification and the overlap; for CLAM the patch
side and the pyramid level it was read at. The level-0 side of a patch follows per slide (TRIDENT's
``patch_size_level0``; CLAM's side times the slide's downsample at that level), as HistCode's own tiling does
for 20x and 40x scans under one spec. Every check happens here, before anything is written: a file that fails
one is reported by name with the reason and leaves no trace in any store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histcode.exchange.h5files import ExchangeError, FeatureFile
from histcode.wsi.reader import plan_read

IMPORTER_VERSION = 1  # bump when a change here changes which tiles or vectors an imported file gives
TOOLS = ("trident", "clam")


def number(value) -> int | float | None:
    """An attribute as a number (integral floats as int, so 20.0 and 20 name the same grid); None stays None."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ExchangeError(f"{value!r} is not a number") from None
    return int(value) if value.is_integer() else value


@dataclass
class ClamGrid:
    """CLAM's grid where its feature files do not carry it: a folder of its patch files and/or the values."""

    patches_dir: Path | None = None
    patch_size: int | None = None
    patch_level: int | None = None


@dataclass
class SlidePatches:
    """A file's patches, checked: ready to be written as one slide of the imported view."""

    slide: dict  # the catalog's slide row
    source: Path
    sha256: str  # of the content imported (``content_digest``)
    encoder: str | None
    grid: dict  # the imported view's tiling spec (see ``grid_of``)
    size: int  # level-0 side of a patch on this slide
    level: int  # the pyramid level its pixels come from
    coords: np.ndarray  # (N, 2) int64 level-0 top-left corners
    vectors: np.ndarray  # (N, D) float32

    @property
    def slide_id(self) -> str:
        return self.slide["slide_id"]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def _trident_grid(ff: FeatureFile, slide: dict) -> tuple[dict, int, int]:
    a = ff.coords_attrs
    try:
        patch_size = number(a.get("patch_size"))
        target = number(a.get("target_magnification"))
        source = number(a.get("level0_magnification"))
        size = number(a.get("patch_size_level0"))
    except ExchangeError as exc:
        raise ExchangeError(f"{ff.path.name}: coords attributes: {exc}") from None
    if patch_size is None or patch_size <= 0:
        raise ExchangeError(f"{ff.path.name}: no patch_size attribute on coords (TRIDENT writes it with the "
                            "coordinates; is this a CLAM file? use `histcode import clam`)")
    if size is None:
        if not (target and source):
            legacy = " (they carry CLAM's patch_level: try `histcode import clam`)" if "patch_level" in a else ""
            raise ExchangeError(f"{ff.path.name}: coords have neither patch_size_level0 nor level0_magnification "
                                f"and target_magnification to derive it{legacy}")
        size = patch_size * source // target  # as TRIDENT computes it
    for key, have in (("level0_width", slide["width"]), ("level0_height", slide["height"])):
        if a.get(key) is not None and int(a[key]) != int(have):
            raise ExchangeError(f"{ff.path.name}: made from a slide with {key} {int(a[key])}, but slide "
                                f"{slide['slide_id']!r} has {int(have)}: another scan of it?")
    grid = {"importer": "trident", "importer_version": IMPORTER_VERSION, "tile_px": int(patch_size),
            "target_magnification": target, "overlap": int(number(a.get("overlap")) or 0),
            # nominal microns per pixel of the magnification (20x: 0.5 um/px), as HistCode's own specs state it
            "target_mpp": (10.0 / target) if target else None, "min_tissue_fraction": 0.0}
    level = plan_read(tuple(slide["level_downsamples"] or (1.0,)), int(size), int(patch_size)).level
    return grid, int(size), level


def _clam_grid(ff: FeatureFile, slide: dict, given: ClamGrid) -> tuple[dict, int, int]:
    from histcode.exchange.h5files import read_coords_attrs

    a = ff.coords_attrs if "patch_size" in ff.coords_attrs else {}
    where = "its coords attributes"
    if not a and given.patches_dir is not None:
        patch_file = given.patches_dir / ff.path.name
        if patch_file.is_file():
            a, where = read_coords_attrs(patch_file), f"the patch file {patch_file}"
    patch_size = a.get("patch_size", given.patch_size)
    level = a.get("patch_level", given.patch_level)
    if patch_size is None or level is None:
        hint = f"no {ff.path.name} in {given.patches_dir}" if given.patches_dir else "no --patches folder given"
        raise ExchangeError(f"{ff.path.name}: no patch_size / patch_level (CLAM keeps them on the coords of "
                            f"patches/<slide>.h5; {hint}): pass --patches DIR or --patch-size and --patch-level")
    patch_size, level = int(number(patch_size)), int(number(level))
    downsamples = list(slide["level_downsamples"] or [1.0])
    if not 0 <= level < len(downsamples):
        raise ExchangeError(f"{ff.path.name}: patch_level {level} from {where}, but slide {slide['slide_id']!r} has "
                            f"{len(downsamples)} levels")
    dims = slide.get("level_dimensions")
    if a.get("level_dim") is not None and dims is not None and [int(v) for v in a["level_dim"]] != [int(v) for v in dims[level]]:
        raise ExchangeError(f"{ff.path.name}: patched on a slide whose level {level} is {list(a['level_dim'])} px, but "
                            f"slide {slide['slide_id']!r} has {list(dims[level])}: another scan of it?")
    size = int(round(patch_size * float(downsamples[level])))
    grid = {"importer": "clam", "importer_version": IMPORTER_VERSION, "tile_px": patch_size, "patch_level": level,
            "target_mpp": None, "min_tissue_fraction": 0.0}
    return grid, size, level


def _checked_arrays(ff: FeatureFile, slide: dict) -> tuple[np.ndarray, np.ndarray]:
    name, f, c = ff.path.name, ff.features, ff.coords
    if f.size == 0 or c.size == 0:  # TRIDENT writes features of shape (0,) for a slide without tissue
        raise ExchangeError(f"{name}: no patches (features {tuple(f.shape)}, coords {tuple(c.shape)})")
    if f.ndim != 2 or c.ndim != 2 or c.shape[1] != 2:
        raise ExchangeError(f"{name}: features {tuple(f.shape)} and coords {tuple(c.shape)} are not (N, D) and (N, 2)")
    if f.shape[0] != c.shape[0]:
        raise ExchangeError(f"{name}: {f.shape[0]} feature rows but {c.shape[0]} coordinates")
    if not (np.issubdtype(f.dtype, np.floating) or np.issubdtype(f.dtype, np.integer)):
        raise ExchangeError(f"{name}: features of type {f.dtype} are not numbers")
    vectors = f.astype(np.float32)
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ExchangeError(f"{name}: {int(bad.sum())} feature rows are not finite (first at row {int(np.argmax(bad))})")
    if not np.issubdtype(c.dtype, np.number) or not np.all(np.isfinite(c)) or not np.all(np.mod(c, 1) == 0):
        raise ExchangeError(f"{name}: coords are not whole level-0 pixels (type {c.dtype})")
    coords = c.astype(np.int64)
    width, height = int(slide["width"]), int(slide["height"])
    outside = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= width) | (coords[:, 1] >= height)
    if outside.any():
        i = int(np.argmax(outside))
        raise ExchangeError(f"{name}: {int(outside.sum())} of {len(coords)} coords fall outside slide "
                            f"{slide['slide_id']!r} ({width}x{height} px at level 0), e.g. ({coords[i, 0]}, {coords[i, 1]})")
    unique = np.unique(coords, axis=0)
    if len(unique) != len(coords):
        raise ExchangeError(f"{name}: {len(coords) - len(unique)} coords repeat another patch's corner")
    return vectors, coords


def content_digest(grid: dict, encoder: str | None, size: int, coords: np.ndarray, vectors: np.ndarray) -> str:
    """SHA-256 of what an import writes for a slide (grid, encoder, patch side, corners, vectors), not of the
    file's bytes: the same patches in a copied or re-saved file are the same import, new vectors are not."""
    digest = hashlib.sha256(json.dumps([grid, encoder, int(size)], sort_keys=True).encode())
    digest.update(np.ascontiguousarray(coords, np.int64).tobytes())
    digest.update(np.ascontiguousarray(vectors, np.float32).tobytes())
    return digest.hexdigest()


def check_file(ff: FeatureFile, tool: str, slide: dict, encoder: str | None,
               clam: ClamGrid | None = None) -> SlidePatches:
    """``ff`` checked against its catalog slide; ExchangeError naming the file and the reason otherwise."""
    if tool not in TOOLS:
        raise ExchangeError(f"unknown tool {tool!r} (known: {', '.join(TOOLS)})")
    vectors, coords = _checked_arrays(ff, slide)
    grid, size, level = _trident_grid(ff, slide) if tool == "trident" else _clam_grid(ff, slide, clam or ClamGrid())
    if size <= 0:
        raise ExchangeError(f"{ff.path.name}: patch side {size} px at level 0")
    return SlidePatches(slide, ff.path, content_digest(grid, encoder, size, coords, vectors), encoder, grid, size,
                        level, coords, vectors)
