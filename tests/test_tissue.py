"""Tissue detection pieces against independent references (brute-force Otsu, scipy labelling) and on
synthetic images with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from histcode.config import TissueMaskConfig
from histcode.wsi.tissue import (
    detect_tissue,
    drop_small_components,
    fill_small_holes,
    label_components,
    log_otsu_threshold,
    otsu_threshold,
)
from histcode.runtime import resolve_device

from tests.helpers import GLASS

CPU = torch.device("cpu")


def brute_force_otsu(values: np.ndarray, bins: int = 256) -> float:
    """Minimise within-class variance over every bin edge, on bin-quantised values."""
    q = np.clip((values * bins).astype(int), 0, bins - 1)
    centers = (q + 0.5) / bins
    best, best_t = np.inf, 1.0
    for k in range(bins - 1):
        lo, hi = centers[q <= k], centers[q > k]
        if len(lo) == 0 or len(hi) == 0:
            continue
        within = len(lo) * lo.var() + len(hi) * hi.var()
        if within < best - 1e-12:
            best, best_t = within, (k + 1) / bins
    return best_t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(0.1, 0.03, 3000), rng.normal(0.45, 0.08, 1500 + 500 * seed)]).clip(0, 1)
    assert otsu_threshold(torch.from_numpy(values)) == pytest.approx(brute_force_otsu(values), abs=1 / 256)


def test_otsu_constant_image_has_no_split() -> None:
    assert otsu_threshold(torch.full((10, 10), 0.3)) is None


def test_log_otsu_separates_pale_tissue_from_glass_next_to_dark_tumour() -> None:
    rng = np.random.default_rng(0)
    glass = rng.normal(0.01, 0.002, 5000).clip(0.001, 1)
    pale = rng.normal(0.15, 0.04, 2500).clip(0.001, 1)
    tumour = rng.normal(0.5, 0.05, 2500).clip(0.001, 1)
    values = torch.from_numpy(np.concatenate([glass, pale, tumour]))
    linear, logt = otsu_threshold(values), log_otsu_threshold(values)
    assert (pale < linear).mean() > 0.5  # linear Otsu calls most pale tissue glass...
    assert (pale < logt).mean() < 0.02 and (glass >= logt).mean() < 0.001  # ...log Otsu separates them


@pytest.mark.parametrize("seed", range(4))
def test_label_components_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((60, 80)) > 0.55)
    labels = label_components(torch.from_numpy(mask)).numpy()
    ref, n = ndimage.label(mask, structure=np.ones((3, 3)))
    assert (labels >= 0).sum() == mask.sum()
    assert len(np.unique(labels[mask])) == n
    # the same partition: each scipy component maps to exactly one of ours and vice versa
    pairs = set(zip(ref[mask].tolist(), labels[mask].tolist()))
    assert len(pairs) == n


def test_label_components_long_snake_converges() -> None:
    mask = np.zeros((41, 41), dtype=bool)
    for r in range(0, 41, 4):  # a serpentine path much longer than the image side
        mask[r, :] = True
        if r + 4 < 41:
            col = 40 if (r // 4) % 2 == 0 else 0
            mask[r : r + 4, col] = True
    labels = label_components(torch.from_numpy(mask)).numpy()
    assert len(np.unique(labels[mask])) == 1


def test_drop_small_and_fill_holes() -> None:
    mask = np.zeros((50, 50), dtype=bool)
    mask[5:35, 5:35] = True  # 900 px piece
    mask[15:18, 15:18] = False  # 9 px hole
    mask[42:45, 42:45] = True  # 9 px speck
    t = torch.from_numpy(mask)
    cleaned = fill_small_holes(drop_small_components(t, 20), 20).numpy()
    expected = np.zeros_like(mask)
    expected[5:35, 5:35] = True
    np.testing.assert_array_equal(cleaned, expected)
    # a hole above the limit stays open; the border-touching background is never "a hole"
    assert not fill_small_holes(t, 5).numpy()[16, 16]


def _synthetic(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = 120, 160
    image = np.empty((h, w, 3), dtype=np.uint8)
    image[:] = GLASS
    image = np.clip(image + rng.normal(0, 1.5, image.shape), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    disk = (yy - 60) ** 2 + (xx - 70) ** 2 < 35**2
    image[disk] = np.clip(np.array([200, 140, 190]) + rng.normal(0, 12, (disk.sum(), 3)), 0, 255).astype(np.uint8)
    image[10:12, 140:142] = (150, 60, 140)  # a 4 px speck of debris
    return image, disk


def test_detect_tissue_finds_disk_and_drops_speck() -> None:
    image, disk = _synthetic(np.random.default_rng(0))
    cfg = TissueMaskConfig()
    result = detect_tissue(image, 8.0, 16.0, cfg, CPU)
    iou = (result.mask & disk).sum() / (result.mask | disk).sum()
    assert iou > 0.95
    assert not result.mask[8:14, 138:144].any()
    assert result.downsample == (16.0, 16.0) and result.threshold >= cfg.min_saturation


def test_detect_tissue_blank_glass_is_empty() -> None:
    rng = np.random.default_rng(1)
    image = np.clip(np.full((80, 80, 3), GLASS) + rng.normal(0, 2, (80, 80, 3)), 0, 255).astype(np.uint8)
    assert not detect_tissue(image, 8.0, 16.0, TissueMaskConfig(), CPU).mask.any()


def test_flat_all_tissue_image_is_all_tissue_and_edges_survive() -> None:
    image = np.empty((40, 60, 3), np.uint8)
    image[:] = (180, 110, 170)
    result = detect_tissue(image, 8.0, 16.0, TissueMaskConfig(), CPU)
    assert result.otsu is None and result.mask.all()


def test_without_glass_pale_tissue_is_kept_beside_dark_tissue() -> None:
    # no glass in view: Otsu would split pale stroma from purple tumour; the floor decides instead
    image = np.empty((64, 64, 3), np.uint8)
    image[:, :32] = (230, 200, 215)  # pale pink, saturation ~0.13
    image[:, 32:] = (150, 75, 160)  # purple, saturation ~0.53
    result = detect_tissue(image, 8.0, 16.0, TissueMaskConfig(), CPU)
    assert result.mask.all() and result.threshold == TissueMaskConfig().min_saturation


def test_detect_tissue_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        detect_tissue(np.zeros((10, 10), np.uint8), 8.0, 1.0, TissueMaskConfig(), CPU)


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mask_equals_cpu_mask() -> None:
    image, _ = _synthetic(np.random.default_rng(3))
    cfg = TissueMaskConfig()
    cpu = detect_tissue(image, 8.0, 16.0, cfg, CPU)
    gpu = detect_tissue(image, 8.0, 16.0, cfg, torch.device("cuda"))
    assert (cpu.mask != gpu.mask).mean() < 0.001
