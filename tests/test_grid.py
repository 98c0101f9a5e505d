"""Grid and tissue-fraction maths against hand-counted cases and a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from histcode.wsi.grid import grid_positions, tile_size_level0, tissue_fractions


@pytest.mark.parametrize(
    ("slide_mpp", "expected"),
    [(0.5, 256), (0.25, 512), (0.499, 257), (1.0, 128), (0.2527, 507)],
)
def test_tile_size_normalises_scale(slide_mpp: float, expected: int) -> None:
    # 256 px at 0.5 um/px = 128 um of tissue, whatever the scan's magnification
    assert tile_size_level0(256, 0.5, slide_mpp) == expected


def test_tile_size_rejects_non_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        tile_size_level0(256, 0.5, 0.0)


def test_grid_hand_counted() -> None:
    # 1000 x 700 slide, 256 px tiles: 3 whole columns (768 <= 1000 < 1024) and 2 whole rows (512 <= 700 < 768)
    pos = grid_positions(1000, 700, 256)
    assert pos.tolist() == [[0, 0], [256, 0], [512, 0], [0, 256], [256, 256], [512, 256]]


def test_grid_exact_fit_and_too_small() -> None:
    assert len(grid_positions(512, 512, 256)) == 4
    assert len(grid_positions(511, 4096, 256)) == 16  # one whole column (511 < 512) of 4096 / 256 = 16 rows
    assert grid_positions(255, 1000, 256).shape == (0, 2)


def test_grid_origin_offset() -> None:
    pos = grid_positions(1000, 300, 256, origin=(100, 10))
    assert pos.tolist() == [[100, 10], [356, 10], [612, 10]]


def test_tissue_fraction_hand_cases() -> None:
    # a 4 x 4 mask at downsample 64 covers 256 x 256 level-0 px; its left half is tissue
    mask = np.zeros((4, 4), dtype=bool)
    mask[:, :2] = True
    pos = np.array([[0, 0], [128, 0], [64, 0], [96, 128], [192, 192]])
    fr = tissue_fractions(mask, 64.0, pos, 128)
    # [0,128) all tissue; [128,256) none; [64,192) half; [96,224) 32/128; [192,320) outside the mask counts as glass
    np.testing.assert_allclose(fr, [1.0, 0.0, 0.5, 0.25, 0.0])


def test_tissue_fraction_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    ds = 16.0
    full = np.kron(mask, np.ones((16, 16), dtype=bool))  # the mask at level 0
    pos = grid_positions(53 * 16 + 40, 37 * 16 + 40, 100)  # tiles past the mask edge too
    expected = []
    for x, y in pos:
        window = np.zeros((100, 100), dtype=bool)
        crop = full[y : y + 100, x : x + 100]
        window[: crop.shape[0], : crop.shape[1]] = crop
        expected.append(window.mean())
    np.testing.assert_allclose(tissue_fractions(mask, ds, pos, 100), expected, atol=1e-9)


def test_tissue_fraction_with_different_x_and_y_downsamples() -> None:
    # a tall slide whose mask rounding gives 15.75 level-0 px per mask column but 16 per row
    mask = np.zeros((8, 4), dtype=bool)
    mask[:4] = True  # the top half: level-0 rows [0, 64)
    fr = tissue_fractions(mask, (15.75, 16.0), np.array([[0, 32], [0, 64]]), 32)
    np.testing.assert_allclose(fr, [1.0, 0.0])


def test_tissue_fraction_empty_positions() -> None:
    assert tissue_fractions(np.ones((2, 2), bool), 4.0, np.zeros((0, 2), dtype=np.int64), 8).shape == (0,)
