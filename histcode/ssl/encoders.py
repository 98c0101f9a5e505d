"""Encoder registry: a backbone that maps RGB images in [0, 1] to one feature vector per image.

Names: ``resnet18`` (512-d), ``resnet18_l3`` (ResNet-18 truncated after layer3, 256-d), ``resnet50``
(2048-d), ``resnet50_l3`` (ResNet-50 truncated after layer3, 1024-d, the paper's), ``timm:<model>`` for
any timm architecture (optional extra ``histcode[foundation]``), and ``colour``: no network, each image's mean and
standard deviation per RGB channel (6-d), the colour-statistics baseline every comparison reports beside the
encoders (DESIGN section 8: colour is not class). Published pathology foundation encoders, built from
local weights, are in ``histcode.ssl.foundation``. Input normalisation is part of the module, so the
exported model takes plain [0, 1] images. Nothing is downloaded: ``init='imagenet'`` loads torchvision weights
only if they are already in torch's cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from histcode.errors import HistcodeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderError(HistcodeError, ValueError):
    """An unknown encoder, or weights that are not available on this machine."""


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Encoder(nn.Module):
    """images (N, 3, H, W) float in [0, 1] -> features (N, dim)."""

    def __init__(self, backbone: nn.Module, dim: int, name: str, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.dim = dim
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


@dataclass(frozen=True)
class _Spec:
    builder: str
    dim: int
    weights: str | None  # torchvision weights enum member, for init='imagenet'


TORCHVISION = {
    "resnet18": _Spec("resnet18", 512, "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet18_l3": _Spec("resnet18", 256, "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet50": _Spec("resnet50", 2048, "ResNet50_Weights.IMAGENET1K_V2"),
    "resnet50_l3": _Spec("resnet50", 1024, "ResNet50_Weights.IMAGENET1K_V2"),
}


COLOUR = "colour"


class ColourStatistics(nn.Module):
    """(N, 3, H, W) -> (N, 6): per channel, the mean and the standard deviation of the image's pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        return torch.cat([flat.mean(dim=2), flat.std(dim=2)], dim=1)


def available() -> list[str]:
    return sorted(TORCHVISION) + [COLOUR, "timm:<name>"]


def _weights_state(weights_name: str) -> dict:
    import torchvision

    enum_name, member = weights_name.split(".")
    weights = getattr(getattr(torchvision.models, enum_name), member)
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise EncoderError(
            f"ImageNet weights {weights_name} are not on this machine (expected {path}); they cannot be downloaded "
            "here. Copy the file there, or use init 'random'."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _truncate_after_layer3(resnet: nn.Module) -> nn.Module:
    return nn.Sequential(
        resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2, resnet.layer3,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def build_encoder(name: str, init: str = "random") -> Encoder:
    if init not in ("random", "imagenet"):
        raise EncoderError(f"init must be 'random' or 'imagenet', got {init!r}")
    if name.startswith("timm:"):
        return _timm_encoder(name, init)
    if name == COLOUR:  # nothing to initialise; read in [0, 1] as the images come
        return Encoder(ColourStatistics(), 6, COLOUR, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    spec = TORCHVISION.get(name)
    if spec is None:
        raise EncoderError(f"unknown encoder {name!r}; available: {', '.join(available())}")
    import torchvision

    resnet = getattr(torchvision.models, spec.builder)(weights=None)
    if init == "imagenet":
        resnet.load_state_dict(_weights_state(spec.weights))
    if name.endswith("_l3"):
        backbone = _truncate_after_layer3(resnet)
    else:
        resnet.fc = nn.Identity()
        backbone = resnet
    return Encoder(backbone, spec.dim, name)


def _timm_encoder(name: str, init: str) -> Encoder:
    try:
        import timm
    except ImportError as exc:
        raise EncoderError(f"{name} needs timm: pip install 'histcode[foundation]'") from exc
    arch = name.split(":", 1)[1]
    if init == "imagenet":
        raise EncoderError(f"{name}: pretrained timm weights would have to be downloaded; use init 'random'")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        raise EncoderError(f"unknown timm architecture {arch!r}: {exc}") from exc
    return Encoder(model, int(model.num_features), name)
