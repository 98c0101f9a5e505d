"""Published slide encoders: a whole slide's tile embeddings (and where the tiles lie) -> one slide vector.

TRIDENT, LazySlide and STAMP embed slides with the aggregators their authors pretrained over a named tile
encoder's features. Each entry here says which tile encoder it reads (``tile_encoder``, a ``FOUNDATION`` name,
and the name TRIDENT gives the same extraction), the feature width, how far apart its tokens lie on the slide
(``patch_um``: the tile pitch in microns it was trained at; None for an aggregator that ignores positions), its
weight file and key layout, and its licence. Architectures are HistCode's own code, written from the authors'
published code (each class names the file it follows); they are built on ``torch.device("meta")`` and loaded
strictly by ``histcode.ssl.weights.load_slide_encoder``.

An entry whose architecture could not be checked against its authors' code, or whose weights' terms do not
allow it, is kept with ``refused`` saying why: ``build_slide_encoder`` raises that reason instead of building a
guess whose keys would not be the published ones.

Every built encoder takes ``forward(features (1, N, in_dim), cells (1, N, 2) long: (column, row) of each tile on
the encoder's own grid)`` and returns ``(1, dim)``. The grid is ``floor(level-0 microns / patch_um)`` (GigaPath's
``coords_to_pos``), or, for an entry with ``tile_grid``, the tiles counted from the slide's smallest corner in the
view's own tile size (TITAN's ``preprocess_features``); an entry without ``patch_um`` ignores positions.
TITAN's architecture is in ``histcode.ssl.titan``, PRISM's in ``histcode.ssl.prism``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histcode.ssl.encoders import EncoderError
from histcode.ssl.prism import PrismSlideEncoder
from histcode.ssl.titan import TitanSlideEncoder


@dataclass(frozen=True)
class SlideEncoderSpec:
    """One published slide encoder. ``skipped``: key prefixes of the published file that are not the slide
    embedding (a text decoder, classifiers); they are listed so a strict load accepts exactly those and no
    other extra key."""

    name: str
    title: str
    developer: str
    card: str
    hf_repo: str | None
    licence: str
    tile_encoder: str  # the FOUNDATION entry whose features it reads
    trident_names: tuple[str, ...]  # the same extraction as TRIDENT names it (imported views)
    in_dim: int
    dim: int
    patch_um: float | None  # the tile pitch it was trained at, in microns (None: positions unused)
    weight_files: tuple[str, ...] = ()
    weight_format: str = "PyTorch checkpoint"
    skipped: tuple[str, ...] = ()
    params_m: float = 0.0  # millions of parameters of the slide-embedding part, as built
    refused: str | None = None  # why HistCode does not build it (then it is listed, never built)
    tile_grid: bool = False  # cells: tiles counted from the slide's smallest corner (TITAN), not level-0 microns
    notes: str = ""
    args: dict = field(default_factory=dict)

    @property
    def key_layout(self) -> str:
        return f"{self.name} (authors' module names)"

    def describe(self) -> dict:
        return {"name": self.name, "title": self.title, "developer": self.developer, "card": self.card,
                "hf_repo": self.hf_repo, "licence": self.licence, "tile_encoder": self.tile_encoder,
                "trident_names": list(self.trident_names), "in_dim": self.in_dim, "dim": self.dim,
                "patch_um": self.patch_um, "weight_files": list(self.weight_files),
                "weight_format": self.weight_format, "skipped": list(self.skipped), "params_m": self.params_m,
                "refused": self.refused, "tile_grid": self.tile_grid, "notes": self.notes}


SLIDE_ENCODERS: dict[str, SlideEncoderSpec] = {s.name: s for s in (
    SlideEncoderSpec(
        "prov-gigapath-slide", "Prov-GigaPath slide encoder", "Providence / Microsoft",
        "https://github.com/prov-gigapath/prov-gigapath", "prov-gigapath/prov-gigapath",
        "Prov-GigaPath licence (Apache-2.0 terms, research use; gated: accept the terms on the model card)",
        "prov-gigapath", ("gigapath",), in_dim=1536, dim=768, patch_um=256 * 0.5,
        weight_files=("slide_encoder.pth",), weight_format="PyTorch checkpoint with a 'model' key",
        params_m=86.3, args={"embed_dim": 768, "depth": 12, "heads": 16, "ffn": 3072, "ngrids": 1000,
                             "segments": (1024, 5792, 32768, 185363, 1048576), "dilations": (1, 2, 4, 8, 16)},
        notes="gigapath/slide_encoder.py gigapath_slide_enc12l768d: LongNet (torchscale, sub-LN, dilated attention) "
              "over 256-px tiles at 20x, 2-D sin-cos position of each tile's grid cell; class token of the last "
              "layer (the authors' default, global_pool=False)"),
    SlideEncoderSpec(
        "chief", "CHIEF (slide embedding)", "Harvard Medical School (Yu lab)", "https://github.com/hms-dbmi/CHIEF",
        None, "GPL-3.0 / AGPL-3.0 code; weights for non-commercial academic use, on request from the authors",
        "ctranspath", ("ctranspath", "chief"), in_dim=768, dim=768, patch_um=None,
        weight_files=("CHIEF_pretraining.pth",), weight_format="PyTorch state dict (torch.save)",
        skipped=("classifiers.", "instance_classifiers.", "att_head.", "text_to_vision.", "organ_embedding"),
        params_m=0.66, args={"hidden": 512, "attention": 256},
        notes="models/CHIEF.py size 'small': gated attention over CHIEF-CTransPath features; the slide embedding "
              "(WSI_feature) is the attention-weighted mean of the 768-d tile features; the organ-text branch "
              "and classifiers are skipped"),
    SlideEncoderSpec(
        "titan", "TITAN (slide embedding)", "Mahmood Lab", "https://huggingface.co/MahmoodLab/TITAN",
        "MahmoodLab/TITAN", "CC-BY-NC-ND-4.0; gated: research use only, accept the terms on the model card",
        "conch-v1.5", ("conch_v15",), in_dim=768, dim=768, patch_um=512 * 0.5, tile_grid=True,
        weight_files=("model.safetensors",), weight_format="safetensors (Hugging Face transformers)",
        skipped=("text_encoder.",), params_m=48.5,
        args={"embed_dim": 768, "depth": 6, "heads": 12, "mlp_ratio": 4.0, "pool_heads": 8, "pool_queries": 128},
        notes="modeling_titan.py encode_slide_from_patch_features, vision_transformer.py VisionTransformer: "
              "CONCH v1.5 features of 512-px tiles at 20x on the slide's tile grid (shared cells summed, all-zero "
              "cells dropped), Linear+GELU, class token, 6 pre-norm ViT layers (12 heads) with 2-D ALiBi over the "
              "cells' distances, LayerNorm, the contrastive CoCa pooler (1 query) before its projection; the text "
              "tower is skipped"),
    SlideEncoderSpec(
        "prism", "PRISM (slide embedding)", "Paige", "https://huggingface.co/paige-ai/Prism", "paige-ai/Prism",
        "CC-BY-NC-ND-4.0; gated: non-commercial research use, accept the terms on the model card",
        "virchow", ("virchow",), in_dim=2560, dim=1280, patch_um=None,
        weight_files=("model.safetensors",), weight_format="safetensors (Hugging Face transformers)",
        skipped=("text_decoder.", "img_to_latents.", "text_to_latents.", "temperature"), params_m=99.0,
        args={"latent_seq": 512, "latent_dim": 1280, "mhsa_heads": 8, "depth": 8, "transformer_depth": 6,
              "share_xattn_start": 1, "share_tf_start": 0, "xattn_heads": 1, "mlp_mult": 1},
        notes="modeling_prism.py slide_representations, perceiver.py PerceiverResampler: Perceiver (513 latents of "
              "1280, 8 layers of cross-attention to the Virchow v1 tile embeddings and 6 self-attention blocks, "
              "GEGLU, shared across layers as the authors share them) over the tiles in any order; the first "
              "latent through cls_norm; the BioGPT text decoder and contrastive heads are skipped"),
)}


def slide_encoder_names() -> list[str]:
    return list(SLIDE_ENCODERS)


def slide_encoder_spec(name: str) -> SlideEncoderSpec:
    spec = SLIDE_ENCODERS.get(name.lower())
    if spec is None:
        raise EncoderError(f"unknown slide encoder {name!r}; known: {', '.join(SLIDE_ENCODERS)}")
    return spec


# -- Prov-GigaPath: LongNet over tile embeddings ----------------------------------------------------------------
def sincos_2d(cells: torch.Tensor, dim: int, ngrids: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding of grid index ``k = column * ngrids + row`` (as GigaPath's
    ``coords_to_pos`` numbers cells), computed for the cells given rather than stored for all ngrids**2: the
    first half of the dimensions encodes ``k % ngrids``, the second ``k // ngrids`` (MAE's meshgrid order).
    ``cells``: (..., 2) long (column, row) -> (..., dim)."""
    k = cells[..., 0] * ngrids + cells[..., 1]
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64, device=cells.device) / (half / 2.0))

    def one(pos: torch.Tensor) -> torch.Tensor:
        out = pos.to(torch.float64)[..., None] * omega
        return torch.cat([out.sin(), out.cos()], dim=-1)

    return torch.cat([one(k % ngrids), one(torch.div(k, ngrids, rounding_mode="floor"))], dim=-1).float()


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: tuple[int, ...],
                      dilations: tuple[int, ...]) -> torch.Tensor:
    """LongNet's dilated attention (Ding et al. 2023; torchscale ``DilatedAttention``), (B, L, H, D) each.

    For each (segment length w, dilation r): the sequence is cut into segments of min(w, L) (zero-padded at the
    end), each segment zero-padded to a multiple of r; the heads are split into r groups and group g attends
    among the positions g, g + r, ... of its segment (padded positions included, as zero keys and values). A
    position's output is the branches' outputs weighted by the softmax of their log-sum-exp, where a branch in
    which a head does not see the position contributes nothing."""
    b, length, heads, d = q.shape
    scale = d ** -0.5
    outs, lses = [], []
    for w, r in zip(segments, dilations):
        if heads % r:
            raise EncoderError(f"dilated attention: {heads} heads cannot be split into {r} groups")
        s = min(w, length)
        n = -(-length // s)
        m = -(-s // r)

        def segs(t: torch.Tensor) -> torch.Tensor:
            t = F.pad(t, (0, 0, 0, 0, 0, n * s - length)).reshape(b * n, s, heads, d)
            return F.pad(t, (0, 0, 0, 0, 0, m * r - s))

        qs, ks, vs = segs(q), segs(k), segs(v)
        out = qs.new_zeros(qs.shape)
        lse = qs.new_full(qs.shape[:3], -1e8)
        group = heads // r
        for g in range(r):
            hs, pos = slice(g * group, (g + 1) * group), slice(g, None, r)
            qg, kg, vg = (t[:, pos, hs].transpose(1, 2) for t in (qs, ks, vs))  # (bn, group, m, d)
            scores = (qg @ kg.transpose(-1, -2)) * scale
            out[:, pos, hs] = (scores.softmax(-1) @ vg).transpose(1, 2)
            lse[:, pos, hs] = torch.logsumexp(scores, -1).transpose(1, 2)
        outs.append(out[:, :s].reshape(b, n * s, heads, d)[:, :length])
        lses.append(lse[:, :s].reshape(b, n * s, heads)[:, :length])
    weights = torch.stack(lses).softmax(0)
    return sum(o * w[..., None] for o, w in zip(outs, weights))


class LongNetAttention(nn.Module):
    """torchscale ``MultiheadAttention`` with sub-LN (``inner_attn_ln`` before the output projection), computed
    as dilated attention."""

    def __init__(self, dim: int, heads: int, segments, dilations) -> None:
        super().__init__()
        self.heads, self.segments, self.dilations = heads, tuple(segments), tuple(dilations)
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.inner_attn_ln = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        split = lambda t: t.reshape(b, length, self.heads, dim // self.heads)  # noqa: E731
        out = dilated_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                self.segments, self.dilations)
        return self.out_proj(self.inner_attn_ln(out.reshape(b, length, dim)))


class LongNetFFN(nn.Module):
    """torchscale ``FeedForwardNetwork`` with sub-LN: fc1, GELU, LayerNorm over the hidden width, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.ffn_layernorm = nn.LayerNorm(hidden, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x).float()).type_as(x)))


class LongNetLayer(nn.Module):
    """torchscale ``EncoderLayer`` as LongNet configures it: pre-norm (sub-LN implies it), residual scale 1."""

    def __init__(self, dim: int, heads: int, hidden: int, segments, dilations) -> None:
        super().__init__()
        self.self_attn = LongNetAttention(dim, heads, segments, dilations)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=1e-5)
        self.ffn = LongNetFFN(dim, hidden)
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class LongNetEncoder(nn.Module):
    """torchscale ``Encoder`` over token embeddings: the layers, then the output LayerNorm
    (``encoder_normalize_before`` and ``normalize_output``)."""

    def __init__(self, dim: int, depth: int, heads: int, hidden: int, segments, dilations) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LongNetLayer(dim, heads, hidden, segments, dilations) for _ in range(depth))
        self.layer_norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class PatchEmbed(nn.Module):
    """GigaPath's slide patch embedding: a Linear from the tile width to the model width."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class GigaPathSlideEncoder(nn.Module):
    """Prov-GigaPath's ``LongNetViT`` (gigapath/slide_encoder.py): tile embeddings -> Linear -> + 2-D sin-cos
    position of the tile's cell -> class token in front -> LongNet -> LayerNorm -> class token (or, with
    ``global_pool``, the LayerNorm of the mean patch token)."""

    def __init__(self, in_dim: int = 1536, embed_dim: int = 768, depth: int = 12, heads: int = 16, ffn: int = 3072,
                 ngrids: int = 1000, segments=(1024,), dilations=(1,), global_pool: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.ngrids, self.global_pool = embed_dim, ngrids, global_pool
        self.patch_embed = PatchEmbed(in_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.encoder = LongNetEncoder(embed_dim, depth, heads, ffn, segments, dilations)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, features: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        if cells.numel() and not cells.is_meta and (int(cells.min()) < 0 or int(cells.max()) >= self.ngrids):
            raise EncoderError(f"tile cells must lie in [0, {self.ngrids}) on the slide grid, got "
                               f"{int(cells.min())}..{int(cells.max())}")
        x = self.patch_embed(features) + sincos_2d(cells, self.embed_dim, self.ngrids).to(features.dtype)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # the class token's position is 0
        x = self.encoder(x)
        return self.norm(x[:, 1:].mean(1)) if self.global_pool else self.norm(x)[:, 0]


# -- CHIEF: gated attention pooling ------------------------------------------------------------------------------
class GatedAttention(nn.Module):
    """CLAM's ``Attn_Net_Gated`` (the names CHIEF keeps): tanh and sigmoid branches multiplied, then a score."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        self.attention_b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid())
        self.attention_c = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h))


class ChiefSlideEncoder(nn.Module):
    """CHIEF's slide embedding (models/CHIEF.py ``forward`` -> ``WSI_feature``): ``attention_net`` = Linear,
    ReLU, Dropout, gated attention (the Sequential indices are the published keys' 0 and 3); the attention,
    softmaxed over the tiles, weights the ORIGINAL tile features: softmax(A)^T h (768-d)."""

    def __init__(self, in_dim: int = 768, hidden: int = 512, attention: int = 256) -> None:
        super().__init__()
        self.attention_net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.25),
                                           GatedAttention(hidden, attention))

    def forward(self, features: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.attention_net(features)  # (1, N, 1)
        return (scores.softmax(dim=1) * features).sum(dim=1)


# -- building --------------------------------------------------------------------------------------------------
def _build(spec: SlideEncoderSpec) -> nn.Module:
    a = spec.args
    if spec.name == "prov-gigapath-slide":
        return GigaPathSlideEncoder(spec.in_dim, a["embed_dim"], a["depth"], a["heads"], a["ffn"], a["ngrids"],
                                    a["segments"], a["dilations"])
    if spec.name == "chief":
        return ChiefSlideEncoder(spec.in_dim, a["hidden"], a["attention"])
    if spec.name == "titan":
        return TitanSlideEncoder(spec.in_dim, a["embed_dim"], a["depth"], a["heads"], a["mlp_ratio"], a["pool_heads"],
                                 a["pool_queries"])
    if spec.name == "prism":
        return PrismSlideEncoder(spec.in_dim, a["latent_seq"], a["latent_dim"], a["mhsa_heads"], a["depth"],
                                 a["transformer_depth"], a["share_xattn_start"], a["share_tf_start"],
                                 a["xattn_heads"], a["mlp_mult"])
    raise EncoderError(f"slide encoder {spec.name} has no architecture in HistCode")


def build_slide_encoder(name: str, weightless: bool = False) -> nn.Module:
    """The entry's architecture, in eval mode; ``weightless``: on the meta device (no memory, no initialisation)
    for a load that assigns every weight. A refused entry raises its reason."""
    spec = slide_encoder_spec(name)
    if spec.refused:
        raise EncoderError(f"slide encoder {spec.name} ({spec.title}) is listed but not built: {spec.refused}")
    if weightless:
        with torch.device("meta"):
            return _build(spec).eval()
    return _build(spec).eval()


def grid_cells(x_um, y_um, patch_um: float | None) -> torch.Tensor:
    """(1, N, 2) long (column, row) of tiles whose level-0 corners lie at ``x_um``, ``y_um`` microns, on a grid of
    ``patch_um`` cells (as GigaPath's ``coords_to_pos`` floors coordinates by the tile size); zeros for an
    encoder that ignores positions."""
    x = torch.tensor(np.asarray(x_um, dtype=np.float64))
    y = torch.tensor(np.asarray(y_um, dtype=np.float64))
    if patch_um is None:
        return torch.zeros(1, len(x), 2, dtype=torch.long)
    # a corner a rounding error short of a cell boundary belongs to that cell
    cells = torch.stack([torch.floor(x / patch_um + 1e-6), torch.floor(y / patch_um + 1e-6)], dim=-1)
    return cells.long()[None]


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def materialise(module: nn.Module, seed: int = 0) -> nn.Module:
    """A module built on meta given memory and its own initialisation (for tests and random baselines): Xavier
    Linear weights, unit LayerNorms, zero biases, other matrices (tokens, queries, latents) N(0, 0.02)."""
    torch.manual_seed(seed)
    module = module.to_empty(device="cpu")
    done: set[int] = set()
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        else:
            continue
        done.update(id(p) for p in m.parameters(recurse=False))
    for p in module.parameters():
        if id(p) in done:
            continue
        if p.dim() > 1:
            nn.init.normal_(p, std=0.02)
        else:
            nn.init.zeros_(p)
    return module


def shared_names(module: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that hold one tensor (a module the architecture reuses across layers, as
    PRISM's Perceiver does), each in state-dict order."""
    groups: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def fill_shared(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` with each name of a shared tensor filled from the one the file holds: Hugging Face's safetensors
    writer keeps one name per shared tensor (the first), ``torch.save`` keeps all. Names of one shared tensor
    that the file holds with different values are an error naming both."""
    state = dict(state)
    for names in shared_names(module):
        present = [n for n in names if n in state]
        if not present:
            continue
        first = state[present[0]]
        for name in present[1:]:
            other = state[name]
            if first.is_meta or other.is_meta:
                continue
            if other.shape != first.shape or not torch.equal(other, first):
                raise EncoderError(f"{source}: {name} differs from {present[0]}, which the architecture shares with "
                                   "it (one module reused across layers)")
        for name in names:
            state.setdefault(name, first)
    return state
