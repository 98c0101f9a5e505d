"""Stain estimation and normalisation against Macenko et al. (2009), and the probe's re-staining.

The reference here is the paper's model of a stained image, not our code: pixels are synthesised as
Beer-Lambert mixtures ``OD = c_H h + c_E e`` of two known unit stain vectors with known concentrations
(I = 256 exp(-OD) - 1); Macenko's method must recover the vectors (the extreme angles of the OD plane) and the
99th-percentile concentrations, and normalising two stainings of the same tissue must give the same image:
the concentrations rescaled to the reference maxima and recomposed with the reference vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histcode.config import ProbeConfig, StainNormConfig


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _tissue(h, e, n=40000, seed=0):
    """uint8 pixels of a synthetic tissue: 15% pure haematoxylin, 15% pure eosin, the rest mixtures, plus
    some glass; returns (rgb (n, 3), concentrations (n, 2))."""
    rng = np.random.default_rng(seed)
    conc = rng.gamma(2.0, 0.35, size=(n, 2)) + 0.15
    kind = rng.random(n)
    conc[kind < 0.15, 1] = 0.0
    conc[(kind >= 0.15) & (kind < 0.3), 0] = 0.0
    conc[kind > 0.97] = 0.0  # glass
    od = conc @ np.stack([_unit(h), _unit(e)])
    rgb = np.clip(np.round(256 * np.exp(-od) - 1), 0, 255).astype(np.uint8)
    return rgb, conc


H_TRUE = (0.60, 0.74, 0.30)
E_TRUE = (0.12, 0.95, 0.29)


def test_macenko_recovers_the_stain_vectors_and_concentration_maxima():
    from histcode.wsi.stain import estimate_stain

    rgb, conc = _tissue(H_TRUE, E_TRUE)
    est = estimate_stain(rgb, beta=0.15, alpha=1.0)
    h, e = np.asarray(est.vectors)
    assert h @ _unit(H_TRUE) > 0.995 and e @ _unit(E_TRUE) > 0.995, est
    # Macenko's maxima: the 99th percentile of each stain's concentration over the stained pixels
    od = -np.log((rgb.astype(np.float64) + 1) / 256)
    stained = np.linalg.norm(od, axis=1) > 0.15
    expected = np.percentile(conc[stained], 99, axis=0)
    assert np.allclose(est.max_conc, expected, rtol=0.05), (est.max_conc, expected)


def test_two_stainings_of_the_same_tissue_normalise_to_one_image():
    from histcode.wsi.stain import MACENKO_MAX, MACENKO_VECTORS, apply_od_transform, estimate_stain

    rgb_a, conc = _tissue(H_TRUE, E_TRUE, seed=1)
    # the same concentrations, stained by another site: other vectors, stronger haematoxylin, weaker eosin
    h_b, e_b = _unit((0.70, 0.66, 0.27)), _unit((0.10, 0.96, 0.26))
    od_b = (conc * [1.3, 0.8]) @ np.stack([h_b, e_b])
    rgb_b = np.clip(np.round(256 * np.exp(-od_b) - 1), 0, 255).astype(np.uint8)
    norm_a = apply_od_transform(rgb_a, estimate_stain(rgb_a).to_reference())
    norm_b = apply_od_transform(rgb_b, estimate_stain(rgb_b).to_reference())
    before = np.abs(rgb_a.astype(int) - rgb_b.astype(int)).mean()
    after = np.abs(norm_a.astype(int) - norm_b.astype(int)).mean()
    assert after < 3.0 and after < before / 5, (before, after)
    # and the result is the paper's: concentrations scaled to the reference maxima, reference vectors
    ref = np.stack([_unit(v) for v in MACENKO_VECTORS])
    od = -np.log((rgb_a.astype(np.float64) + 1) / 256)
    stained = np.linalg.norm(od, axis=1) > 0.15
    scaled = conc * (np.asarray(MACENKO_MAX) / np.percentile(conc[stained], 99, axis=0))
    expected = np.clip(np.round(256 * np.exp(-(scaled @ ref)) - 1), 0, 255)
    assert np.abs(norm_a.astype(float) - expected)[stained].mean() < 3.0


def test_glass_has_no_stain_to_estimate():
    from histcode.wsi.stain import StainError, estimate_stain

    with pytest.raises(StainError, match="stained pixels"):
        estimate_stain(np.full((64, 64, 3), 245, np.uint8))


def test_one_stain_alone_cannot_be_unmixed():
    from histcode.wsi.stain import StainError, estimate_stain

    rng = np.random.default_rng(2)
    conc = rng.gamma(2.0, 0.4, size=(20000, 1)) + 0.2
    rgb = np.clip(np.round(256 * np.exp(-(conc * _unit(H_TRUE))) - 1), 0, 255).astype(np.uint8)
    with pytest.raises(StainError, match="one stain only"):
        estimate_stain(rgb)


def test_identity_map_returns_the_tile():
    from histcode.wsi.stain import apply_od_transform

    rgb, _ = _tissue(H_TRUE, E_TRUE, n=5000)
    back = apply_od_transform(rgb, np.eye(3, dtype=np.float32))
    assert np.abs(back.astype(int) - rgb.astype(int)).max() <= 1


def test_restained_probe_tiles_are_reproducible_and_keep_the_glass_white():
    from histcode.ssl.probe import restained

    rgb, _ = _tissue(H_TRUE, E_TRUE, n=64 * 64)
    tile = torch.from_numpy(rgb.reshape(64, 64, 3).transpose(2, 0, 1).copy())
    tiles = torch.stack([tile, tile, tile])
    tiles[2] = 255  # a glass tile
    cfg = ProbeConfig(stain_log_sd=0.5, stain_angle=10.0)
    a, b = restained(tiles, cfg, seed=3), restained(tiles, cfg, seed=3)
    assert torch.equal(a, b)
    assert (a[0] != tiles[0]).float().mean() > 0.5 and not torch.equal(a[0], a[1])  # each tile its own stain
    assert int(a[2].min()) >= 254


def test_stain_setting_round_trips_through_the_encoder_tag():
    from histcode.ssl.stain_norm import describe, parse

    cfg = StainNormConfig(sample_tiles=12, alpha=2.0)
    assert parse(describe(cfg)) == cfg
    assert parse(None).method == "none" and parse(describe(StainNormConfig(method="none"))).method == "none"
    with pytest.raises(ValueError, match="stain_norm tag"):
        parse("{not json")


def test_slides_of_different_sites_read_in_the_reference_stain(tiled_workspace):
    """Real demo slides, each site with its own stain: after normalisation every slide's tiles carry the
    reference stain vectors, and the slides' stains agree far better than as read."""
    from histcode.ssl.dataset import dataset_from_catalog
    from histcode.ssl.stain_norm import normalise_dataset, sample_indices
    from histcode.store.catalog import Catalog
    from histcode.tiling.spec import spec_id_of
    from histcode.wsi.stain import MACENKO_VECTORS, estimate_stain

    cfg = StainNormConfig(sample_tiles=8)
    catalog = Catalog.of(tiled_workspace)
    spec = spec_id_of(tiled_workspace.config().tiling)

    def stains(normalise: bool) -> np.ndarray:
        dataset = dataset_from_catalog(catalog, spec, 128)
        if normalise:
            assert normalise_dataset(dataset, cfg) == {}
            assert all(s.stain is not None for s in dataset.slides)
        out = []
        for index in range(len(dataset.slides)):
            rows = sample_indices(np.flatnonzero(dataset.tiles[:, 0] == index), 8)
            pixels = np.stack([dataset[int(i)].numpy().transpose(1, 2, 0) for i in rows])
            out.append(np.asarray(estimate_stain(pixels).vectors).ravel())
        dataset.close()
        return np.array(out)

    raw, normalised = stains(False), stains(True)
    reference = np.concatenate([_unit(v) for v in MACENKO_VECTORS])
    assert len(raw) >= 3
    # (re-estimated on the normalised pixels, which are clipped to [0, 255]: close, not exact)
    assert np.abs(normalised - reference).mean() < 0.05 < np.abs(raw - reference).mean()
    assert normalised.std(axis=0).sum() < raw.std(axis=0).sum() / 3


# --- scanner_shift, against Beer-Lambert written out here (not the module's helpers) ---------------------------

RJ_H = (0.650, 0.704, 0.286)  # Ruifrok & Johnston (2001), haematoxylin and eosin OD vectors
RJ_E = (0.072, 0.990, 0.105)


def _scanner_reference(rgb: np.ndarray, s: float) -> np.ndarray:
    """Scanner shift from the equations: OD = -ln((I + 1) / 256); OD = c_H h + c_E e + c_r n with h, e the unit
    Ruifrok-Johnston vectors and n the unit normal of their plane; c_H x (1 + 0.3 s), c_E x (1 - 0.25 s), c_r kept;
    OD' clipped at 0; I = 256 exp(-OD') - 1 in [0, 255]; I' = 128 + (1 - 0.15 s) (I - 128), rounded, clipped."""
    h, e = _unit(RJ_H), _unit(RJ_E)
    n = _unit(np.cross(h, e))
    basis = np.stack([h, e, n])  # rows: OD = c @ basis
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / 256.0)
    conc = np.linalg.solve(basis.T, od.T).T  # c with c @ basis = od
    conc *= [1 + 0.3 * s, 1 - 0.25 * s, 1.0]
    shifted = np.maximum(conc @ basis, 0.0)
    intensity = np.clip(256.0 * np.exp(-shifted) - 1.0, 0.0, 255.0)
    out = 128.0 + (1 - 0.15 * s) * (intensity - 128.0)
    return np.clip(np.round(out), 0, 255).astype(np.uint8).reshape(rgb.shape)


def _unmix_h_e(rgb: np.ndarray) -> np.ndarray:
    """(c_H, c_E) of pixels by the same equations, for reading what a shift did."""
    h, e = _unit(RJ_H), _unit(RJ_E)
    basis = np.stack([h, e, _unit(np.cross(h, e))])
    od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / 256.0)
    return np.linalg.solve(basis.T, od.T).T[:, :2]


@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0, 2.0, 3.7])
def test_scanner_shift_follows_beer_lambert(strength):
    from histcode.wsi.stain import scanner_shift

    tissue, _ = _tissue(H_TRUE, E_TRUE, n=20000, seed=3)
    rng = np.random.default_rng(4)
    pixels = np.concatenate([tissue, rng.integers(0, 256, size=(20000, 3)).astype(np.uint8)])
    image = pixels.reshape(200, 200, 3)
    got = scanner_shift(image, strength)
    want = _scanner_reference(image, strength)
    assert got.shape == image.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())
    assert (got != image).mean() > 0.9  # it did shift


def test_scanner_shift_is_the_identity_at_zero():
    from histcode.wsi.stain import scanner_shift

    image = np.random.default_rng(5).integers(0, 256, size=(64, 48, 3)).astype(np.uint8)
    same = scanner_shift(image, 0)
    assert np.array_equal(same, image) and same is not image
    # and the computing path itself is the identity in the limit (not only the s = 0 shortcut)
    nearly = scanner_shift(image, 1e-9)
    assert np.abs(nearly.astype(int) - image.astype(int)).max() <= 1


@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
def test_scanner_shift_turns_glass_into_one_greyish_white(strength):
    from histcode.wsi.stain import scanner_shift

    grey = round(128 + 127 * (1 - 0.15 * strength))  # 245, 236, 217
    blank = np.full((32, 32, 3), 255, np.uint8)
    assert np.all(scanner_shift(blank, strength) == grey)
    # glass beside tissue: the same white wherever it is, and the brightest, neutral pixel of the image
    tissue, _ = _tissue(H_TRUE, E_TRUE, n=32 * 32, seed=6)
    image = tissue.reshape(32, 32, 3).copy()
    image[::3, ::5] = 255
    out = scanner_shift(image, strength)
    assert np.all(out[::3, ::5] == grey)
    assert out.max() == grey and out.min() >= 0


def test_scanner_shift_adds_haematoxylin_to_a_nuclear_pixel():
    from histcode.wsi.stain import scanner_shift

    h, e = _unit(RJ_H), _unit(RJ_E)
    nucleus = np.clip(np.round(256 * np.exp(-(1.2 * h + 0.2 * e)) - 1), 0, 255).astype(np.uint8).reshape(1, 1, 3)
    strengths = np.arange(0, 2.01, 0.25)
    conc = np.array([_unmix_h_e(scanner_shift(nucleus, s))[0] for s in strengths])
    assert np.all(np.diff(conc[:, 0]) > 0), conc  # more haematoxylin with every step, despite the flatter contrast
    assert np.all(np.diff(conc[:, 1]) < 0), conc  # less eosin
    assert conc[0, 0] == pytest.approx(1.2, abs=0.02)


@pytest.mark.parametrize("bad", [-0.1, 4.5, float("nan")])
def test_scanner_shift_refuses_strengths_outside_its_range(bad):
    from histcode.wsi.stain import scanner_shift

    with pytest.raises(ValueError, match="strength"):
        scanner_shift(np.zeros((2, 2, 3), np.uint8), bad)


def test_scanner_shift_refuses_non_8_bit_rgb():
    from histcode.wsi.stain import scanner_shift

    with pytest.raises(ValueError, match="uint8"):
        scanner_shift(np.zeros((2, 2, 3), np.float32), 1.0)
    with pytest.raises(ValueError, match="uint8"):
        scanner_shift(np.zeros((2, 2, 4), np.uint8), 1.0)


# --- the glass white point ---------------------------------------------------------------------------------------

def test_the_white_point_is_the_glass_not_the_palest_tissue():
    from histcode.wsi.stain import estimate_white

    rng = np.random.default_rng(0)
    tissue = np.stack([rng.integers(150, 235, 4000), rng.integers(60, 160, 4000), rng.integers(150, 230, 4000)], 1)
    glass = np.clip(rng.normal([221, 224, 218], 1.5, size=(1000, 3)).round(), 0, 255)
    white = estimate_white(np.concatenate([tissue, glass]).astype(np.uint8))
    # OD of the glass's colour by Beer-Lambert, -ln((I + 1) / 256)
    np.testing.assert_allclose(white, -np.log((np.array([221, 224, 218]) + 1.0) / 256.0), atol=0.01)
    assert estimate_white(tissue.astype(np.uint8)) is None  # pink and purple only: no glass, nothing taken out


def test_white_point_undoes_most_of_a_scanner_shift_on_real_tiles(tiled_workspace):
    """Real demo tiles and the same tiles as a dimmer, flatter scanner shows them (``scanner_shift``):
    normalised with the glass's white point taken out first, the two read far closer than Macenko alone
    (which reads the grey cast as stain and moves them further apart than they were)."""
    from histcode.ssl.dataset import dataset_from_catalog
    from histcode.ssl.stain_norm import sample_indices
    from histcode.store.catalog import Catalog
    from histcode.tiling.spec import spec_id_of
    from histcode.wsi.stain import (apply_od_transform, estimate_stain, estimate_white, od_to_rgb, rgb_to_od,
                                    scanner_shift, white_balance)

    catalog = Catalog.of(tiled_workspace)
    dataset = dataset_from_catalog(catalog, spec_id_of(tiled_workspace.config().tiling), 128)
    rows = sample_indices(np.flatnonzero(dataset.tiles[:, 0] == 0), 24)
    tiles = np.stack([dataset[int(i)].numpy().transpose(1, 2, 0) for i in rows])
    dataset.close()

    def normalised(rgb, white_point):
        white = estimate_white(rgb) if white_point else None
        balanced = rgb if white is None else od_to_rgb(white_balance(rgb_to_od(rgb), white))
        return apply_od_transform(rgb, estimate_stain(balanced).to_reference(), white).astype(int)

    shifted = scanner_shift(tiles, 1.0)
    as_read = np.abs(tiles.astype(int) - shifted).mean()
    plain = np.abs(normalised(tiles, False) - normalised(shifted, False)).mean()
    white = np.abs(normalised(tiles, True) - normalised(shifted, True)).mean()
    assert white < plain / 2 and white < as_read / 2, (as_read, plain, white)


def test_encoders_registered_before_the_white_point_read_without_it():
    import json

    from histcode.ssl.stain_norm import describe, parse

    old = {k: v for k, v in json.loads(describe(StainNormConfig())).items() if k != "white_point"}
    assert parse(json.dumps(old)).white_point is False
    assert parse(describe(StainNormConfig())).white_point is True
