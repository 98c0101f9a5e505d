"""Read grid tiles of one slide at the tiling spec's resolution: the project's reader.

It picks the pyramid level once (the coarsest that does not upsample), decodes that level's stored JPEG tiles
directly where the format allows (see ``tiff_tiles``) and reads through the slide's reader everywhere else, then
resizes to the output size. One TileReader per process or thread: it holds open file handles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histcode.wsi.dispatch import open_slide
from histcode.wsi.reader import RegionPlan, plan_read, resize_rgb
from histcode.wsi.tiff_tiles import DirectTiffLevel, find_direct_level


class TileReader:
    def __init__(
        self,
        path: str | Path,
        vendor: str | None,
        level_dimensions: list[list[int]] | tuple,
        level_downsamples: list[float] | tuple,
        size_l0: int,
        out_px: int,
        direct: bool = True,
    ) -> None:
        self.path = Path(path)
        self.downsamples = tuple(level_downsamples)
        self.plan: RegionPlan = plan_read(self.downsamples, size_l0, out_px)
        ds = self.downsamples[self.plan.level]
        # OpenSlide maps level-0 coordinates to a level by x / downsample and paints at sub-pixel offsets, so
        # pixel-identical direct reads exist only where that division is exact (always at level 0)
        whole = abs(ds - round(ds)) < 1e-9
        page = find_direct_level(self.path, vendor, tuple(level_dimensions[self.plan.level])) if direct and whole else None
        self._direct = DirectTiffLevel(self.path, page) if page is not None else None
        # the catalog's vendor names the reader (OpenSlide, or image_reader's): no format detection per open
        self._slide = None if self._direct is not None else open_slide(self.path, vendor)

    @classmethod
    def for_slide(cls, slide: dict, size_l0: int, out_px: int, direct: bool = True) -> TileReader:
        """From a row of the catalog's ``slides`` table."""
        return cls(slide["path"], slide["vendor"], slide["level_dimensions"], slide["level_downsamples"], size_l0,
                   out_px, direct)

    @property
    def is_direct(self) -> bool:
        return self._direct is not None

    def read(self, x: int, y: int) -> np.ndarray:
        """The level-0 square at (x, y) of side ``size_l0`` as an (out_px, out_px, 3) RGB array."""
        plan = self.plan
        if self._direct is not None:
            ds = round(self.downsamples[plan.level])
            region = self._direct.region(int(x) // ds, int(y) // ds, plan.read_px, plan.read_px)
        else:
            region = self._slide.read_region((int(x), int(y)), plan.level, (plan.read_px, plan.read_px))
        return resize_rgb(region, (plan.out_px, plan.out_px))

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        if self._slide is not None:
            self._slide.close()

    def __enter__(self) -> TileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
