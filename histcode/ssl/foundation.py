"""Published pathology foundation encoders: what each one is, and how to build its architecture.

Every entry says what its authors published: the architecture (a timm model and its exact arguments, as the
model card or the authors' loader gives them), the weight files and their key layout, the input size and the
microns per pixel it was trained at, its input normalisation, how an embedding is pooled from its tokens, its
output dimension and its licence, with the model card it comes from. Nothing is downloaded: the weights are
read from a local file or a Hugging Face cache folder by ``histcode.ssl.weights``, and must be obtained from
their authors under their terms.

``build_foundation(name)`` returns an ``Encoder`` (images in [0, 1] -> (N, dim)) with the entry's normalisation
inside, so it is exported, registered and embedded like the encoders HistCode trains. Build it under
``torch.device("meta")`` to inspect the largest ones without memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from histcode.ssl.encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderError

Pooling = Literal["cls", "cls+patch_mean", "attentional", "avgpool"]
KeyLayout = Literal["timm", "hf-dinov2", "swin-original", "conch-vision"]

KAIKO_MEAN = KAIKO_STD = (0.5, 0.5, 0.5)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


@dataclass(frozen=True)
class FoundationSpec:
    """One published encoder. ``timm_args`` name callables by string (``SwiGLUPacked``, ``SiLU``) so the entry
    prints as data; ``weight_files`` are the file names the authors publish, in order of preference."""

    name: str
    title: str
    developer: str
    card: str  # the model card or repository the entry is taken from
    hf_repo: str | None  # where the weights are published (a Hugging Face cache folder of it is accepted)
    licence: str
    timm_model: str
    timm_args: dict = field(default_factory=dict)
    pooling: Pooling = "cls"
    dim: int = 0
    input_px: int = 224
    mpp: float = 0.5  # microns per pixel of the model's input, as trained
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weight_files: tuple[str, ...] = ("pytorch_model.bin",)
    weight_format: str = "PyTorch state dict (torch.save)"
    key_layout: KeyLayout = "timm"
    params_m: float = 0.0  # millions of parameters, as built
    notes: str = ""
    # published SHA-256 of weight files by file name (the Hugging Face LFS digest of the file page); filled only
    # from a published value, never guessed: an entry without one registers with a warning to check the card
    sha256: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def describe(self) -> dict:
        """The entry as plain data (for `histcode encoders list --format json` and the registered version)."""
        return {
            "name": self.name, "title": self.title, "developer": self.developer, "card": self.card,
            "hf_repo": self.hf_repo, "licence": self.licence, "architecture": f"timm {self.timm_model}",
            "timm_args": {k: str(v) for k, v in self.timm_args.items()}, "pooling": self.pooling, "dim": self.dim,
            "input_px": self.input_px, "mpp": self.mpp, "mean": list(self.mean), "std": list(self.std),
            "weight_files": list(self.weight_files), "weight_format": self.weight_format,
            "key_layout": self.key_layout, "params_m": self.params_m, "notes": self.notes,
            "sha256": {k: list(v) for k, v in self.sha256.items()},
        }


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}

FOUNDATION: dict[str, FoundationSpec] = {s.name: s for s in (
    FoundationSpec(
        "uni", "UNI", "Mahmood Lab", "https://huggingface.co/MahmoodLab/UNI", "MahmoodLab/UNI",
        "CC-BY-NC-ND-4.0; gated: research use only, accept the terms on the model card",
        "vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        dim=1024, params_m=303.4, notes="DINOv2 ViT-L/16 on Mass-100K; 20x"),
    FoundationSpec(
        "uni2-h", "UNI2-h", "Mahmood Lab", "https://huggingface.co/MahmoodLab/UNI2-h", "MahmoodLab/UNI2-h",
        "CC-BY-NC-ND-4.0; gated: research use only, accept the terms on the model card",
        "vit_giant_patch14_224", {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                                  "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
                                  "dynamic_img_size": True, **_SWIGLU},
        dim=1536, params_m=681.4, notes="ViT-H/14 with 8 register tokens and SwiGLU; 20x"),
    FoundationSpec(
        "conch-v1.5", "CONCH v1.5 (vision tower)", "Mahmood Lab", "https://huggingface.co/MahmoodLab/conchv1_5",
        "MahmoodLab/conchv1_5", "CC-BY-NC-ND-4.0; gated: research use only, accept the terms on the model card",
        "vit_large_patch16_224", {"img_size": 448, "patch_size": 16, "init_values": 1.0, "dynamic_img_size": True},
        pooling="attentional", dim=768, input_px=448, mpp=0.5 * 512 / 448, weight_files=("pytorch_model_vision.bin",),
        key_layout="conch-vision", params_m=307.0,
        notes="ViT-L/16 trunk, CoCa attentional pooler (1 query, 8 heads) and a LayerNorm; 512-px tiles at 20x "
              "resized to 448 px, so 0.571 um/px at the input; the TITAN patch encoder"),
    FoundationSpec(
        "virchow2", "Virchow2", "Paige", "https://huggingface.co/paige-ai/Virchow2", "paige-ai/Virchow2",
        "CC-BY-NC-ND-4.0; gated: non-commercial research use, accept the terms on the model card",
        "vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375,
                                 "dynamic_img_size": True, **_SWIGLU},
        pooling="cls+patch_mean", dim=2560, params_m=631.2, weight_files=("pytorch_model.bin", "model.safetensors"),
        notes="ViT-H/14, 4 register tokens; embedding = class token and the mean of the patch tokens (registers "
              "excluded), 2 x 1280; trained at 5x-40x, 20x recommended"),
    FoundationSpec(
        "virchow", "Virchow", "Paige", "https://huggingface.co/paige-ai/Virchow", "paige-ai/Virchow",
        "Apache-2.0 terms for non-commercial research use; gated: accept the terms on the model card",
        "vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True,
                                 **_SWIGLU},
        pooling="cls+patch_mean", dim=2560, params_m=631.2, weight_files=("pytorch_model.bin", "model.safetensors"),
        notes="ViT-H/14 without register tokens; embedding = class token and the mean of the patch tokens, "
              "2 x 1280; 20x; the tile encoder PRISM aggregates"),
    FoundationSpec(
        "phikon-v2", "Phikon-v2", "Owkin", "https://huggingface.co/owkin/phikon-v2", "owkin/phikon-v2",
        "Owkin non-commercial licence (research use); see the model card",
        "vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        dim=1024, weight_files=("model.safetensors",), weight_format="safetensors (Hugging Face transformers)",
        key_layout="hf-dinov2", params_m=303.4,
        notes="DINOv2 ViT-L/16 published as a transformers Dinov2Model; its keys are converted to timm's; class "
              "token of the last hidden state; 20x",
        # huggingface.co/owkin/phikon-v2/blob/419e8285b80eac3b60beca0d9b91942d48ad7b8e/model.safetensors (Git LFS)
        sha256={"model.safetensors": ("261ae680fa699b3b951597fd57aa19c02ef735805acb104b93af69b36d928569",)}),
    FoundationSpec(
        "h-optimus-0", "H-optimus-0", "Bioptimus", "https://huggingface.co/bioptimus/H-optimus-0",
        "bioptimus/H-optimus-0", "Apache-2.0",
        "vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        dim=1536, mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, params_m=1134.8,
        weight_files=("pytorch_model.bin", "model.safetensors"), notes="ViT-g/14, 4 register tokens; 0.5 um/px"),
        # no digest: the one published page found (refs/pr/2, "Add model") may not be main's file, and a wrong
        # digest would refuse the genuine weights
    FoundationSpec(
        "prov-gigapath", "Prov-GigaPath (tile encoder)", "Providence / Microsoft",
        "https://huggingface.co/prov-gigapath/prov-gigapath", "prov-gigapath/prov-gigapath",
        "Prov-GigaPath licence (Apache-2.0 terms, research use; gated: accept the terms on the model card)",
        "vit_giant_patch14_dinov2", {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                                     "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334,
                                     "dynamic_img_size": True},
        dim=1536, params_m=1135.0, notes="ViT-g/16 tile encoder (the slide encoder is not part of it); 256-px tiles "
                                         "at 20x centre-cropped to 224"),
    FoundationSpec(
        "ctranspath", "CTransPath", "Wang et al. (TransPath)", "https://github.com/Xiyue-Wang/TransPath",
        None, "GPL-3.0 (code); weights shared by the authors for research use",
        "swin_tiny_patch4_window7_224", {"img_size": 224}, pooling="avgpool", dim=768, mpp=1.0,
        weight_files=("ctranspath.pth", "CHIEF_CTransPath.pth"), weight_format="PyTorch checkpoint with a 'model' key",
        key_layout="swin-original", params_m=27.5,
        notes="Swin-T with a convolutional stem; published in the original Swin layout (downsampling at the end of "
              "a stage), converted to timm's; the authors leave the scale open: 1.0 um/px here, --mpp overrides"),
    FoundationSpec(
        "kaiko-vit-s16", "Kaiko ViT-S/16", "kaiko.ai", "https://github.com/kaiko-ai/towards_large_pathology_fms",
        "1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms", "Apache-2.0",
        "vit_small_patch16_224", {"img_size": 224, "dynamic_img_size": True}, dim=384, mean=KAIKO_MEAN, std=KAIKO_STD,
        weight_files=("model.safetensors",), weight_format="safetensors (timm)", params_m=21.7,
        notes="DINO ViT-S/16 on TCGA; the small one, runs on a CPU; 20x"),
)}


def foundation_names() -> list[str]:
    return list(FOUNDATION)


def foundation_spec(name: str) -> FoundationSpec:
    spec = FOUNDATION.get(name.lower())
    if spec is None:
        raise EncoderError(f"unknown foundation encoder {name!r}; known: {', '.join(FOUNDATION)}")
    return spec


class ClassAndPatchMean(nn.Module):
    """Virchow's embedding: the class token next to the mean of the patch tokens (register tokens left out)."""

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens:].mean(1)], dim=-1)


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler (Yu et al. 2022): learned queries attend over the image tokens with multi-head
    cross-attention; keys and queries are layer-normalised first. Parameter names follow CONCH's release."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.heads = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, context_dim) -> (B, n_queries, d_model)
        b, n, _ = tokens.shape
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        split = lambda t: t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, -1, q.shape[-1]))


class ConchVision(nn.Module):
    """CONCH v1.5's vision tower: ViT-L/16 tokens -> attentional pooler -> LayerNorm (768-d)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(768, trunk.embed_dim, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


class ConvStem(nn.Module):
    """CTransPath's patch embedding (Wang et al. 2022): two stride-2 3x3 convolutions with batch norm and ReLU,
    then a 1x1 convolution to the embedding width, in place of Swin's 4x4 patchify. Output NHWC, as timm's Swin
    expects; the Sequential's indices match the published keys (``patch_embed.proj.0`` ... ``proj.6``)."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, output_fmt="NHWC",
                 **_) -> None:
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise EncoderError(f"ConvStem needs patch size 4 and a width divisible by 8, got {patch_size}, {embed_dim}")
        size = img_size if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        self.img_size, self.patch_size = tuple(size), (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        c1, c2 = embed_dim // 8, embed_dim // 4
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, c1, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.Conv2d(c2, embed_dim, 1),
        )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        self.output_fmt = output_fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.output_fmt == "NHWC":
            x = x.permute(0, 2, 3, 1)
        else:
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)


def _timm_args(spec: FoundationSpec) -> dict:
    from timm.layers import SwiGLUPacked

    named = {"SwiGLUPacked": SwiGLUPacked, "SiLU": nn.SiLU}
    return {k: named.get(v, v) if isinstance(v, str) else v for k, v in spec.timm_args.items()}


def build_foundation(name: str, weightless: bool = False) -> Encoder:
    """The entry's architecture with random weights (load published ones with ``histcode.ssl.weights``).
    ``weightless``: the ViT backbones are built on the meta device, without memory or initialisation, for a load
    that assigns every weight (half the memory of building and then copying: 4.5 GB, not 9, for a 1.1B-parameter
    encoder). Swin's recomputed buffers need a real build, so CTransPath is always built on the CPU."""
    try:
        import timm
    except ImportError as exc:
        raise EncoderError(f"foundation encoder {name} needs timm: pip install 'histcode[foundation]'") from exc
    spec = foundation_spec(name)
    if weightless and spec.key_layout != "swin-original":
        with torch.device("meta"):
            backbone = build_foundation(name).backbone
        return Encoder(backbone, spec.dim, f"foundation:{spec.name}", spec.mean, spec.std)
    args = _timm_args(spec)
    if spec.pooling == "avgpool":
        backbone = timm.create_model(spec.timm_model, pretrained=False, num_classes=0, embed_layer=ConvStem, **args)
    elif spec.pooling == "attentional":
        trunk = timm.create_model(spec.timm_model, pretrained=False, num_classes=0, global_pool="", **args)
        backbone = ConchVision(trunk)
    elif spec.pooling == "cls+patch_mean":
        trunk = timm.create_model(spec.timm_model, pretrained=False, num_classes=0, global_pool="", **args)
        backbone = nn.Sequential(trunk, ClassAndPatchMean(trunk.num_prefix_tokens))
    else:
        backbone = timm.create_model(spec.timm_model, pretrained=False, num_classes=0, global_pool="token", **args)
    return Encoder(backbone, spec.dim, f"foundation:{spec.name}", spec.mean, spec.std)


def timm_module(encoder: Encoder) -> nn.Module:
    """The timm model inside a built foundation encoder (the one published state dicts load into)."""
    backbone = encoder.backbone
    if isinstance(backbone, nn.Sequential) and isinstance(backbone[-1], ClassAndPatchMean):
        return backbone[0]
    return backbone
