"""The project's tile reader returns OpenSlide's pixels, byte for byte, on every format it decodes directly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from histcode.wsi.reader import OpenSlideReader, plan_read, read_square
from histcode.wsi.tile_reader import TileReader
from tests.conftest import SLIDES
from tests.helpers import slide_with_rect, write_svs


def _compare(path, vendor, size_l0, positions) -> bool:
    with OpenSlideReader(path) as ref:
        dims, ds = ref.level_dimensions, ref.level_downsamples
        plan = plan_read(ds, size_l0, 256)
        with TileReader(path, vendor, dims, ds, size_l0, 256) as reader:
            for x, y in positions:
                np.testing.assert_array_equal(reader.read(x, y), read_square(ref, x, y, plan), err_msg=f"{path} {x},{y}")
            return reader.is_direct


def test_cmu1_aligned_misaligned_and_past_the_edge() -> None:
    # 240 px storage tiles vs 257 px grid tiles: reads straddle stored tiles; the last ones run off the image
    positions = [(0, 0), (257, 257), (1028, 1285), (100, 37), (2056, 2827), (2100, 2900)]
    assert _compare(SLIDES / "CMU-1-Small-Region.svs", "aperio", 257, positions)


def test_demo_formats(tiny_cohort) -> None:
    slides = pd.read_csv(tiny_cohort.out_dir / "slides.csv")
    for row in slides.drop_duplicates(["format", "magnification"]).itertuples():
        size = 256 if row.magnification == 20 else 512
        positions = [(0, 0), (size, 2 * size), (3 * size + 64, size + 8)]
        assert _compare(tiny_cohort.out_dir / row.path, row.format, size, positions), row.path


def test_coarser_level_read(tmp_path) -> None:
    # 2 um/px tiles of a 0.5 um/px slide come from the 4x level
    image = slide_with_rect(np.random.default_rng(0), (2048, 2048), (0, 0, 2048, 2048))
    path = write_svs(tmp_path / "big.svs", image)
    with TileReader(path, "aperio", [[2048, 2048], [512, 512]], [1.0, 4.0], 1024, 256) as reader:
        assert reader.plan.level == 1 and reader.plan.read_px == 256
    assert _compare(path, "aperio", 1024, [(0, 0), (1024, 1024)])


def test_fractional_downsample_levels_fall_back_to_openslide(tmp_path) -> None:
    # 4101 x 4099 px: OpenSlide's 4x level has downsample 4.0019..., where only OpenSlide's mapping is exact
    image = slide_with_rect(np.random.default_rng(1), (4099, 4101), (0, 0, 4101, 4099))
    path = write_svs(tmp_path / "odd.svs", image)
    with OpenSlideReader(path) as ref:
        dims, ds = ref.level_dimensions, ref.level_downsamples
    assert ds[1] != round(ds[1])
    with TileReader(path, "aperio", dims, ds, 1024, 256) as reader:
        assert reader.plan.level == 1 and not reader.is_direct
    with TileReader(path, "aperio", dims, ds, 256, 256) as reader:
        assert reader.plan.level == 0 and reader.is_direct
    assert not _compare(path, "aperio", 1024, [(0, 0), (1024, 2048)])


def test_other_vendors_use_openslide() -> None:
    path = SLIDES / "boxes.tiff"
    with OpenSlideReader(path) as ref:
        reader = TileReader(path, "hamamatsu", ref.level_dimensions, ref.level_downsamples, 64, 64)
    assert not reader.is_direct
    reader.close()


def test_corrupt_tile_data_raises_a_slide_error(tmp_path) -> None:
    from histcode.wsi.reader import SlideReadError

    image = slide_with_rect(np.random.default_rng(0), (512, 512), (0, 0, 512, 512))
    path = write_svs(tmp_path / "c.svs", image)
    import tifffile

    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + 400] = b"\x00" * 400  # wipe the JPEG header of the first stored tile
    path.write_bytes(bytes(data))
    with TileReader(path, "aperio", [[512, 512]], [1.0], 256, 256) as reader, pytest.raises(SlideReadError, match="tile 0"):
        reader.read(0, 0)
