"""Two-view augmentation as a kornia AugmentationSequential, applied to whole batches on the device.

The pipeline holds the MoCo v2 / SimCLR transforms and what histology adds; every knob comes from
``pretrain.augment``. With the defaults a view is: a random resized crop (scale 0.2-1), horizontal and vertical
flips (p 0.5 each), a 90-degree rotation (p 0.5), an H&E stain jitter in optical-density space (Tellez et al.
2018; p 0.8, concentrations scaled by U(0.5, 1.5) and shifted by U(-0.1, 0.1)) and a Gaussian blur (p 0.5,
sigma 0.1-2 px at 224 px). MoCo v2's colour jitter (0.4/0.4/0.4/0.1) and grayscale are in the pipeline but off
by default (``color_jitter_p`` and ``grayscale_p`` 0; MoCo v2 uses 0.8 and 0.2): once stains are normalised, the
balance of haematoxylin and eosin is information (see docs/pretraining.md).
Randomness comes from torch's global generator: seed it (``torch.manual_seed``) for reproducible views.
"""

from __future__ import annotations

from typing import Any

import torch
from kornia import augmentation as K
from torch import nn

from histcode.config import AugmentConfig

# Ruifrok & Johnston (2001) stain vectors as rows: haematoxylin, eosin, residual (DAB) in RGB optical density.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
OD_EPS = 1e-6


class RandomHEStain(K.IntensityAugmentationBase2D):
    """Scale and shift the haematoxylin and eosin concentrations of each image independently:
    OD = -log(I); C = OD @ inv(M); C' = C * a + b with a ~ U(1 - scale, 1 + scale), b ~ U(-shift, shift) for
    H and E (the residual channel is left alone); I' = exp(-C' @ M), clamped to [0, 1]."""

    def __init__(self, scale: float = 0.05, shift: float = 0.05, p: float = 0.5) -> None:
        super().__init__(p=p, same_on_batch=False)
        self.scale, self.shift = scale, shift
        m = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)
        self.register_buffer("rgb_from_hed", m, persistent=False)
        self.register_buffer("hed_from_rgb", torch.linalg.inv(m), persistent=False)

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        n = batch_shape[0]
        alpha = 1 + (torch.rand(n, 2) * 2 - 1) * self.scale
        beta = (torch.rand(n, 2) * 2 - 1) * self.shift
        return {"alpha": alpha, "beta": beta}

    def apply_transform(self, image: torch.Tensor, params: dict[str, torch.Tensor], flags: dict[str, Any],
                        transform: torch.Tensor | None = None) -> torch.Tensor:
        n = image.shape[0]
        dtype = image.dtype
        x = image.float()
        od = -torch.log(x.clamp_min(OD_EPS)).permute(0, 2, 3, 1)  # (N, H, W, 3)
        conc = od @ self.hed_from_rgb.to(x.device)
        alpha = torch.ones(n, 3, device=x.device)
        beta = torch.zeros(n, 3, device=x.device)
        alpha[:, :2] = params["alpha"].to(x.device)
        beta[:, :2] = params["beta"].to(x.device)
        conc = conc * alpha[:, None, None, :] + beta[:, None, None, :]
        rgb = torch.exp(-(conc @ self.rgb_from_hed.to(x.device))).permute(0, 3, 1, 2)
        return rgb.clamp(0, 1).to(dtype)


def _odd(n: float) -> int:
    k = max(3, int(round(n)))
    return k if k % 2 == 1 else k + 1


def build_augmentation(cfg: AugmentConfig, image_px: int) -> nn.Module:
    """One view: (N, 3, h, w) float in [0, 1] (any h, w) -> (N, 3, image_px, image_px)."""
    scale = image_px / 224  # blur sigma is specified for 224 px images
    b, c, s, h = cfg.color_jitter
    return K.AugmentationSequential(
        K.RandomResizedCrop((image_px, image_px), scale=cfg.crop_scale),
        K.RandomHorizontalFlip(p=cfg.hflip_p),
        K.RandomVerticalFlip(p=cfg.vflip_p),
        K.RandomRotation90(times=(1, 3), p=cfg.rot90_p),
        RandomHEStain(cfg.stain_scale, cfg.stain_shift, p=cfg.stain_p),
        K.ColorJitter(b, c, s, h, p=cfg.color_jitter_p),
        K.RandomGrayscale(p=cfg.grayscale_p),
        K.RandomGaussianBlur(_odd(image_px * 0.1), (cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale), p=cfg.blur_p),
        data_keys=["input"],
    )


class TwoViews(nn.Module):
    """Two independently augmented views of a uint8 or float batch."""

    def __init__(self, cfg: AugmentConfig, image_px: int) -> None:
        super().__init__()
        self.augment = build_augmentation(cfg, image_px)

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch
        # interpolation can overshoot by a rounding error; the views are images in [0, 1]
        return self.augment(x).clamp_(0, 1), self.augment(x).clamp_(0, 1)
