"""The real-size slide benchmark's writer (benchmarks/wsi.py), at a tiny size: a 20x slide and the same tissue
at 40x, with the scale recorded as Aperio scanners record it, written from bands (``tiff_writer.Bands``) as
the full-size 40x slide must be."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
from PIL import Image

from benchmarks.wsi import RowsOf, Upsampled, write_pair
from histcode.config import TilingConfig
from histcode.demo.compose import upsample
from histcode.demo.tiff_writer import write_aperio_svs, write_generic_tiff
from histcode.runtime import resolve_device
from histcode.wsi.grid import grid_positions, tile_size_level0, tissue_fractions
from histcode.wsi.reader import OpenSlideReader, render_at_mpp
from histcode.wsi.tissue import detect_tissue

WIDTH, HEIGHT = 1536, 1024


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("wsi"), WIDTH, HEIGHT, block_cells=4, workers=1, quiet=True)


def test_upsampled_bands_are_the_demo_upsample() -> None:
    image = np.random.default_rng(0).integers(0, 256, (301, 410, 3), dtype=np.uint8)
    bands = Upsampled(RowsOf(image), 2)
    assert bands.shape == (602, 820, 3)
    rows = np.concatenate([bands.rows(y, min(602, y + 256)) for y in range(0, 602, 256)])
    assert np.array_equal(rows, upsample(image, 2))


@pytest.mark.parametrize("writer", ["aperio", "generic"])
def test_writing_from_bands_gives_the_pixels_of_writing_the_array(tmp_path, writer) -> None:
    image = np.random.default_rng(1).integers(0, 256, (1100, 1300, 3), dtype=np.uint8)
    paths = [tmp_path / f"array.{writer}.tif", tmp_path / f"bands.{writer}.tif"]
    for path, source in zip(paths, (image, RowsOf(image))):
        if writer == "aperio":
            write_aperio_svs(path, source, 0.5, 20, 90, path.stem)
        else:
            write_generic_tiff(path, source, 0.5, 90)
    with openslide.OpenSlide(paths[0]) as a, openslide.OpenSlide(paths[1]) as b:
        assert a.level_dimensions == b.level_dimensions and a.level_count == 2
        for level, size in enumerate(a.level_dimensions):
            assert np.array_equal(np.asarray(a.read_region((0, 0), level, size)),
                                  np.asarray(b.read_region((0, 0), level, size)))


def test_pair_dimensions_and_scale(pair) -> None:
    assert pair.pieces == 4 and pair.cells > 0  # 7 x 5 cells of 224 px in pieces of at most 4 x 4
    for mag, mpp in ((20, 0.5), (40, 0.25)):
        with openslide.OpenSlide(pair.paths[mag]) as s:
            assert s.properties["openslide.vendor"] == "aperio"
            assert s.dimensions == (WIDTH * mag // 20, HEIGHT * mag // 20)
            assert float(s.properties["openslide.mpp-x"]) == float(s.properties["openslide.mpp-y"]) == mpp
            assert s.properties["openslide.objective-power"] == str(mag)
            assert s.properties["openslide.level[0].tile-width"] == "256"
            assert s.level_downsamples == (1.0, 4.0)


def test_pair_holds_the_same_tissue(pair) -> None:
    with openslide.OpenSlide(pair.paths[20]) as s20, openslide.OpenSlide(pair.paths[40]) as s40:
        low = np.asarray(s20.read_region((0, 0), 0, s20.dimensions).convert("RGB")).astype(np.float32)
        high = s40.read_region((0, 0), 0, s40.dimensions).convert("RGB").resize(s20.dimensions, Image.Resampling.BOX)
    high = np.asarray(high).astype(np.float32)
    assert low.std() > 20  # tissue, not blank glass
    assert np.abs(low - high).mean() < 3  # the same pixels, within JPEG's error at two scales
    assert np.corrcoef(low.ravel(), high.ravel())[0, 1] > 0.98


def test_pair_tiles_into_the_same_physical_tiles(pair) -> None:
    cfg = TilingConfig()
    kept = {}
    for mag in (20, 40):
        with OpenSlideReader(pair.paths[mag]) as reader:
            mpp = 0.5 * 20 / mag
            low, ds = render_at_mpp(reader, mpp, cfg.mask.mpp)
            mask = detect_tissue(low, ds[0] * mpp, ds, cfg.mask, resolve_device("cpu"))
            size = tile_size_level0(cfg.tile_px, cfg.target_mpp, mpp)
            positions = grid_positions(*reader.dimensions, size)
        ok = tissue_fractions(mask.mask, mask.downsample, positions, size) >= cfg.min_tissue_fraction
        kept[mag] = {(int(x) // size, int(y) // size) for x, y in positions[ok]}
    assert kept[20] and len(kept[20] ^ kept[40]) <= max(1, len(kept[20]) // 20)


def test_a_pair_of_the_same_settings_is_reused(pair) -> None:
    folder = pair.paths[20].parent
    stamps = {mag: p.stat().st_mtime_ns for mag, p in pair.paths.items()}
    again = write_pair(folder, WIDTH, HEIGHT, block_cells=4, workers=1, quiet=True)
    assert again.paths == pair.paths and {m: p.stat().st_mtime_ns for m, p in again.paths.items()} == stamps
    assert not (folder / "canvas-20x.u8").exists()
