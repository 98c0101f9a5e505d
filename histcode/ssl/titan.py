"""TITAN's slide encoder (Mahmood Lab): a ViT with 2-D ALiBi over CONCH v1.5 tile features on the slide's grid.

Written from the authors' Hugging Face remote code (MahmoodLab/TITAN ``modeling_titan.py``, ``vision_transformer.py``
and ``configuration_titan.py``, read in public copies of that repository). ``Titan.encode_slide_from_patch_features``
calls ``vision_encoder(features, coords, patch_size_lv0, no_proj=True)``, which

1. places the tiles on a grid (``preprocess_features``): level-0 corners minus the slide's smallest x and y,
   floor-divided by the tile's level-0 size; tiles that share a cell are summed into it; a cell whose features are
   all zero is background and dropped;
2. embeds each kept cell (Linear, GELU), puts a class token in front and runs pre-norm ViT blocks whose attention
   adds, per head, ``-slope * distance`` between the two tokens' cells (ALiBi in 2-D; zero to and from the class
   token); then a LayerNorm;
3. pools all tokens, the class token included, with the contrastive CoCa pooler (one learned query) and returns
   it without the projection ``proj``: a 768-d slide embedding.

The module names are the authors' (``Titan.vision_encoder`` holding their ``VisionTransformer``; its blocks sit in a
``CustomSequential`` whose list is ``modules_list``), so ``vision_encoder.*`` keys of the published
``model.safetensors`` load strictly; its ``text_encoder.*`` keys are not the slide embedding. The caption pooler
(``attn_pool``, 128 queries) and ``proj`` are loaded with the rest of the vision tower but not used here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histcode.ssl.encoders import EncoderError


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's slope per head as TITAN's ``get_alibi`` sets them: for a power of two n, ``r, r^2, ..., r^n`` with
    ``r = 2^(-8/n)``; otherwise those of the largest power of two below n, then every other slope of twice that
    power until there are n."""

    def geometric(n: int) -> list[float]:
        ratio = 2.0 ** (-8.0 / n)
        return [ratio ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return geometric(heads)
    base = 2 ** math.floor(math.log2(heads))
    return geometric(base) + geometric(2 * base)[0::2][: heads - base]


def tile_cells(x, y, tile_px: int) -> torch.Tensor:
    """(1, N, 2) long (column, row) of tiles whose level-0 corners are ``x``, ``y`` pixels, as TITAN's
    ``preprocess_features`` numbers them: ``(corner - the slide's smallest corner) // patch_size_lv0``, with
    ``patch_size_lv0`` the tile's level-0 size (what TRIDENT passes: 512 px at 20x, 1024 at 40x)."""
    if int(tile_px) <= 0:
        raise EncoderError(f"TITAN's grid needs a positive tile size at level 0, got {tile_px}")
    corners = np.stack([np.asarray(x), np.asarray(y)], axis=-1).astype(np.int64).reshape(-1, 2)
    if not len(corners):
        return torch.zeros(1, 0, 2, dtype=torch.long)
    return torch.from_numpy(np.floor_divide(corners - corners.min(axis=0), int(tile_px)))[None]


def occupied_cells(features: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TITAN's grid, kept sparse: one token per occupied cell in the authors' flattening order (by column, then
    row), the sum of the features of the tiles in it; cells whose sum is all zero (background) are dropped.
    ``features`` (N, C), ``cells`` (N, 2) -> (tokens (M, C), their cells (M, 2))."""
    cells = cells - cells.min(dim=0).values
    rows = int(cells[:, 1].max()) + 1
    flat = cells[:, 0] * rows + cells[:, 1]
    unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    summed = features.new_zeros(len(unique), features.shape[-1]).index_add_(0, inverse, features)
    kept = (summed != 0).any(dim=-1)
    if not bool(kept.any()):
        raise EncoderError("every tile's features are zero, which TITAN drops as background")
    unique = unique[kept]
    return summed[kept], torch.stack([unique // rows, unique % rows], dim=-1)


class TitanAttention(nn.Module):
    """Multi-head self-attention with one ``qkv`` projection (query, key, value in that order) and an additive
    per-head bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise EncoderError(f"TITAN: width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


class TitanMlp(nn.Module):
    """timm's ``Mlp`` as TITAN's blocks use it: fc1, GELU, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TitanBlock(nn.Module):
    """A pre-norm ViT block (LayerNorm eps 1e-6, no layer scale)."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TitanAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TitanMlp(dim, hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


class TitanBlocks(nn.Module):
    """The blocks, under the name the authors' ``CustomSequential`` gives its list (``modules_list``)."""

    def __init__(self, blocks: list[TitanBlock]) -> None:
        super().__init__()
        self.modules_list = nn.ModuleList(blocks)


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler as TITAN has it: learned queries (LayerNorm ``ln_q``) attend over the
    LayerNorm'd tokens (``ln_k``) with torch's ``MultiheadAttention`` (``in_proj_*``, ``out_proj``)."""

    def __init__(self, dim: int, heads: int, queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        k = self.ln_k(x)
        return self.attn(q, k, k, need_weights=False)[0]


class TitanVisionEncoder(nn.Module):
    """TITAN's ``VisionTransformer`` as ``build_vision_tower`` configures it (grid ALiBi, class token, CoCa
    poolers in parallel): tokens of the occupied cells -> the contrastive pooler's output."""

    def __init__(self, in_dim: int = 768, embed_dim: int = 768, depth: int = 6, heads: int = 12,
                 mlp_ratio: float = 4.0, pool_heads: int = 8, pool_queries: int = 128) -> None:
        super().__init__()
        self.slopes = alibi_slopes(heads)
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = TitanBlocks([TitanBlock(embed_dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn_pool = AttentionalPooler(embed_dim, pool_heads, pool_queries)  # captions; loaded, not used here
        self.attn_pool_contrastive = AttentionalPooler(embed_dim, pool_heads, 1)
        self.proj = nn.Parameter(torch.zeros(embed_dim, embed_dim))  # to the text space; the embedding is before it

    def alibi(self, cells: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(1, heads, M + 1, M + 1): ``-slope * Euclidean distance`` between cells; 0 in the class token's row
        and column."""
        pos = cells.to(torch.float32)
        distance = torch.cdist(pos, pos, compute_mode="donot_use_mm_for_euclid_dist")
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=cells.device)
        bias = F.pad(-slopes[:, None, None] * distance, (1, 0, 1, 0))
        return bias[None].to(dtype)

    def forward(self, features: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        if features.shape[0] != 1:
            raise EncoderError(f"TITAN encodes one slide at a time, got a batch of {features.shape[0]}")
        tokens, kept = occupied_cells(features[0].float(), cells[0])
        x = self.patch_embed(tokens.to(self.cls_token.dtype))[None]
        x = torch.cat([self.cls_token.expand(1, -1, -1), x], dim=1)
        bias = self.alibi(kept, x.dtype)
        for block in self.blocks.modules_list:
            x = block(x, bias)
        return self.attn_pool_contrastive(self.norm(x))[:, 0]


class TitanSlideEncoder(nn.Module):
    """``Titan`` without its text tower: ``vision_encoder`` (the published keys' prefix)."""

    def __init__(self, in_dim: int = 768, embed_dim: int = 768, depth: int = 6, heads: int = 12,
                 mlp_ratio: float = 4.0, pool_heads: int = 8, pool_queries: int = 128) -> None:
        super().__init__()
        self.vision_encoder = TitanVisionEncoder(in_dim, embed_dim, depth, heads, mlp_ratio, pool_heads, pool_queries)

    def forward(self, features: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        return self.vision_encoder(features, cells)
