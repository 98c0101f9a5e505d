"""Augmentations keep shape, dtype and device and are reproducible; encoders have the documented dimensions."""

from __future__ import annotations

import pytest
import torch

from histcode.config import AugmentConfig
from histcode.ssl.augment import RandomHEStain, TwoViews
from histcode.ssl.encoders import EncoderError, build_encoder


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return (torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)


@pytest.mark.parametrize("seed", [5, 55, 119])  # seeds where interpolation overshot 1.0 before the clamp
def test_two_views_shape_dtype_range(batch, seed: int) -> None:
    torch.manual_seed(seed)
    v1, v2 = TwoViews(AugmentConfig(), 32)(batch)
    for v in (v1, v2):
        assert v.shape == (6, 3, 32, 32) and v.dtype == torch.float32 and v.device == batch.device
        assert 0.0 <= float(v.min()) and float(v.max()) <= 1.0
    assert not torch.equal(v1, v2)


def test_views_reproducible_with_a_seed(batch) -> None:
    aug = TwoViews(AugmentConfig(), 32)
    torch.manual_seed(11)
    a = aug(batch)
    torch.manual_seed(11)
    b = aug(batch)
    torch.manual_seed(12)
    c = aug(batch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_stain_jitter_identity_and_effect() -> None:
    x = torch.rand(4, 3, 8, 8).clamp(0.05, 1)
    torch.testing.assert_close(RandomHEStain(0.0, 0.0, p=1.0)(x), x, atol=1e-5, rtol=1e-5)
    y = RandomHEStain(0.3, 0.1, p=1.0)(x)
    assert y.shape == x.shape and y.dtype == x.dtype and float((y - x).abs().mean()) > 0.01
    assert 0 <= float(y.min()) and float(y.max()) <= 1


def test_stain_jitter_moves_haematoxylin_not_the_residual_channel() -> None:
    from histcode.ssl.augment import OD_EPS

    stain = RandomHEStain(0.5, 0.0, p=1.0)
    conc = torch.rand(2, 4, 4, 3) * 0.5  # non-negative H, E, residual concentrations: a real stain mixture
    x = torch.exp(-(conc @ stain.rgb_from_hed)).permute(0, 3, 1, 2)
    y = stain(x)
    od = lambda t: -torch.log(t.clamp_min(OD_EPS)).permute(0, 2, 3, 1) @ stain.hed_from_rgb  # noqa: E731
    torch.testing.assert_close(od(y)[..., 2], od(x)[..., 2], atol=1e-4, rtol=1e-4)
    assert float((od(y)[..., 0] - od(x)[..., 0]).abs().max()) > 1e-3


def test_knobs_come_from_config(batch) -> None:
    off = AugmentConfig(crop_scale=(1.0, 1.0), hflip_p=0, vflip_p=0, rot90_p=0, color_jitter_p=0, grayscale_p=0,
                        blur_p=0, stain_p=0)
    v1, v2 = TwoViews(off, 64)(batch)
    torch.testing.assert_close(v1, batch.float() / 255, atol=1e-5, rtol=0)  # all off, full-size crop: identity
    gray = AugmentConfig(grayscale_p=1.0, color_jitter_p=0, stain_p=0)
    g1, _ = TwoViews(gray, 32)(batch)
    torch.testing.assert_close(g1[:, 0], g1[:, 1])


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("resnet18_l3", 256), ("resnet50_l3", 1024), ("resnet50", 2048)])
def test_encoder_dimensions(name: str, dim: int) -> None:
    enc = build_encoder(name).eval()
    with torch.no_grad():
        out = enc(torch.rand(2, 3, 64, 64))
    assert enc.dim == dim and out.shape == (2, dim)


def test_encoder_errors(tmp_path, monkeypatch) -> None:
    with pytest.raises(EncoderError, match="unknown encoder 'vgg'"):
        build_encoder("vgg")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch cache: no weights on disk
    with pytest.raises(EncoderError, match="not on this machine.*cannot be downloaded"):
        build_encoder("resnet18", "imagenet")


def test_imagenet_weights_load_when_on_disk(tmp_path, monkeypatch) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    enc = build_encoder("resnet18", "imagenet")
    torch.testing.assert_close(enc.backbone.conv1.weight, reference.conv1.weight)


def test_timm_encoder() -> None:
    pytest.importorskip("timm")
    enc = build_encoder("timm:resnet10t").eval()
    with torch.no_grad():
        assert enc(torch.rand(1, 3, 32, 32)).shape == (1, enc.dim)
