"""Tissue detection on a low-resolution rendering, in torch/kornia so it runs on CUDA when present.

HSV saturation -> median blur -> Otsu threshold on log saturation (with a floor, so a blank slide gives no tissue instead of
thresholding glass noise) -> morphological close -> drop small components and fill small holes. Areas are in
square microns, so the result does not depend on the slide's magnification.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from histcode.config import TissueMaskConfig


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask and how it maps to level 0: mask pixel (r, c) covers level-0 pixels
    [c * dx, (c + 1) * dx) x [r * dy, (r + 1) * dy) with (dx, dy) = downsample."""

    mask: np.ndarray  # bool (H, W)
    downsample: tuple[float, float]  # level-0 pixels per mask pixel, (x, y)
    threshold: float  # saturation threshold used (after the floor)
    otsu: float | None  # Otsu's threshold before the floor; None when the image does not split

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float | None:
    """Otsu's threshold of values in [0, 1]: the bin edge t maximising between-class variance, so that
    foreground is ``values >= t``. None when the values do not split (a constant image)."""
    flat = values.reshape(-1).float().clamp(0, 1)
    hist = torch.histc(flat, bins=bins, min=0.0, max=1.0).double()
    total = hist.sum()
    if total == 0:
        return None
    p = hist / total
    centers = (torch.arange(bins, dtype=torch.float64, device=p.device) + 0.5) / bins
    omega = torch.cumsum(p, 0)
    mu = torch.cumsum(p * centers, 0)
    mu_t = mu[-1]
    denom = omega * (1 - omega)
    between = torch.where(denom > 1e-12, (mu_t * omega - mu) ** 2 / denom.clamp_min(1e-12), torch.zeros_like(denom))
    if float(between.max()) <= 0:
        return None
    k = int(torch.argmax(between))
    return (k + 1) / bins


def log_otsu_threshold(values: torch.Tensor, eps: float = 2e-3, bins: int = 256) -> float | None:
    """Otsu's threshold computed on log(values), returned in linear units.

    Saturation is a ratio and staining intensity varies multiplicatively, so on the log scale glass (about
    0.01) and pale tissue (0.05-0.2) separate cleanly even when strongly stained tumour (0.4-0.6) is present;
    on the linear scale Otsu then splits tumour from benign tissue instead of tissue from glass.
    """
    lo = float(np.log(eps))
    logs = (torch.log(values.float().clamp_min(eps)) - lo) / -lo  # [eps, 1] -> [0, 1]
    t = otsu_threshold(logs, bins=bins)
    return None if t is None else float(np.exp(lo + t * -lo))


def label_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a 2-D bool mask: background -1, each component one non-negative label.
    On CPU, scipy's two-pass labelling (milliseconds on a whole-slide mask); on a GPU, ``label_components_torch``."""
    if mask.device.type == "cpu":
        from scipy import ndimage

        labels, _ = ndimage.label(mask.numpy(), structure=np.ones((3, 3), dtype=bool))
        return torch.from_numpy(labels.astype(np.int64) - 1)
    return label_components_torch(mask)


def label_components_torch(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels on any torch device: each foreground pixel gets the smallest flat index
    in its component, background -1. Min-propagation over 3x3 neighbourhoods with pointer jumping, so it
    converges in far fewer steps than the component diameter."""
    h, w = mask.shape
    n = h * w
    big = n  # larger than any index
    idx = torch.arange(n, device=mask.device, dtype=torch.int64).reshape(h, w)
    labels = torch.where(mask, idx, torch.full_like(idx, big))
    fg = mask.reshape(-1)
    while True:
        padded = torch.nn.functional.pad(labels[None, None].double().neg(), (1, 1, 1, 1), value=-float(big))
        neighbour_min = torch.nn.functional.max_pool2d(padded, 3, stride=1).neg()[0, 0].long()
        new = torch.where(mask, torch.minimum(labels, neighbour_min), labels)
        flat = new.reshape(-1)
        for _ in range(4):  # pointer jumping: follow each label to its own label
            jumped = torch.where(fg, flat[flat.clamp(max=n - 1)], flat)
            if torch.equal(jumped, flat):
                break
            flat = jumped
        new = flat.reshape(h, w)
        if torch.equal(new, labels):
            break
        labels = new
    return torch.where(mask, labels, torch.full_like(labels, -1))


def drop_small_components(mask: torch.Tensor, min_area_px: float) -> torch.Tensor:
    """Remove foreground components with fewer than ``min_area_px`` pixels."""
    if min_area_px <= 1 or not bool(mask.any()):
        return mask
    labels = label_components(mask)
    flat = labels.reshape(-1)
    counts = torch.bincount(flat[flat >= 0], minlength=mask.numel())
    keep = counts >= min_area_px
    return mask & keep[labels.clamp(min=0)]


def fill_small_holes(mask: torch.Tensor, max_hole_px: float) -> torch.Tensor:
    """Fill background components smaller than ``max_hole_px`` that do not touch the image border."""
    if max_hole_px <= 0:
        return mask
    holes = ~mask
    if not bool(holes.any()):
        return mask
    labels = label_components(holes)
    flat = labels.reshape(-1)
    counts = torch.bincount(flat[flat >= 0], minlength=mask.numel())
    border = torch.cat([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    touches = torch.zeros_like(counts, dtype=torch.bool)
    touches[border[border >= 0]] = True
    small = (counts > 0) & (counts <= max_hole_px) & ~touches
    return mask | (holes & small[labels.clamp(min=0)])


def detect_tissue(rgb: np.ndarray, mask_mpp: float, downsample: float | tuple[float, float], cfg: TissueMaskConfig,
                  device: torch.device) -> TissueMask:
    """Tissue mask of an RGB uint8 (H, W, 3) image rendered at ``mask_mpp`` um/px.

    ``downsample`` is the image's scale relative to level 0 and is only carried into the result.
    """
    import kornia

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"detect_tissue expects RGB uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    image = torch.from_numpy(np.array(rgb)).to(device).permute(2, 0, 1)[None].float() / 255.0
    sat = kornia.color.rgb_to_hsv(image)[:, 1:2]
    k = min(cfg.median_kernel, _largest_odd(min(sat.shape[-2:])))
    if k > 1:  # replicate the border so tissue touching the slide edge is not eroded by padding
        r = k // 2
        padded = torch.nn.functional.pad(sat, (r, r, r, r), mode="replicate")
        sat = kornia.filters.median_blur(padded, (k, k))[..., r:-r, r:-r]
    otsu = log_otsu_threshold(sat) if cfg.otsu_on_log else otsu_threshold(sat)
    # Otsu separates tissue from glass only if there is glass: bright, unsaturated pixels. Without it (all
    # tissue, or no split at all) Otsu would cut pale tissue from dark tissue, so the floor alone decides.
    value = image.amax(dim=1, keepdim=True)
    glass = float(((sat < cfg.min_saturation) & (value > 0.75)).float().mean())
    split = otsu if otsu is not None and glass >= cfg.min_glass_fraction else 0.0
    threshold = min(max(split, cfg.min_saturation), cfg.max_saturation)
    mask = sat >= threshold
    if cfg.close_kernel > 1:
        kernel = torch.ones(cfg.close_kernel, cfg.close_kernel, device=device)
        mask = kornia.morphology.closing(mask.float(), kernel, border_type="geodesic") > 0.5
    mask2d = mask[0, 0]
    px_area = mask_mpp * mask_mpp
    mask2d = drop_small_components(mask2d, cfg.min_component_um2 / px_area)
    mask2d = fill_small_holes(mask2d, cfg.max_hole_um2 / px_area)
    ds = (float(downsample), float(downsample)) if isinstance(downsample, (int, float)) else tuple(map(float, downsample))
    return TissueMask(mask=mask2d.cpu().numpy(), downsample=ds, threshold=threshold, otsu=otsu)


def _largest_odd(n: int) -> int:
    return n if n % 2 == 1 else n - 1
