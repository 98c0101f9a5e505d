"""PRISM's slide encoder (Paige): a Perceiver resampler over Virchow (v1) tile embeddings.

Written from the authors' Hugging Face remote code (paige-ai/Prism ``modeling_prism.py``, ``perceiver.py`` and
``configuring_prism.py``, read in public copies of that repository). ``Prism.slide_representations`` runs
``image_resampler`` (``PerceiverResampler``) over the tile embeddings (2560-d: Virchow's class token and the mean of
its patch tokens) and returns ``image_embedding``, the 1280-d slide embedding TRIDENT and STAMP keep:

- 1 + 512 learned latents (the first one becomes the slide embedding, the others the text decoder's context);
- ``perceiver_depth`` layers, each a cross-attention from the latents to the tiles (LayerNorm on the latents only,
  no biases; ``xattn_heads`` heads), a GEGLU feed-forward, then ``transformer_depth`` self-attention blocks over
  the latents (torch ``MultiheadAttention`` without biases, GEGLU feed-forward), all pre-norm and residual;
- modules are shared across layers as the authors build them: layers after ``share_xattn_start`` reuse that layer's
  cross-attention and feed-forward, layers after ``share_tf_start`` reuse its self-attention blocks;
- the first latent through ``cls_norm`` is the slide embedding (``img_norm`` normalises the others).

Without a tile mask the authors' code passes a float mask of ones, which adds the same constant to every score and
changes nothing; one slide is encoded at a time, so no mask is needed. The module names are the authors'
(``Prism.image_resampler``), so ``image_resampler.*`` keys of the published ``model.safetensors`` load strictly; a
file that stores a shared module once, under its first layer's name (as Hugging Face's safetensors writer does), or
under every layer's name (``torch.save`` of the state dict) both load. The BioGPT text decoder, the contrastive
heads and the temperature are not the slide embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histcode.ssl.encoders import EncoderError


class GEGLU(nn.Module):
    """The first half of the input times the GELU of the second half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return value * F.gelu(gate)


class PrismFeedForward(nn.Module):
    """LayerNorm, then ``net``: Linear to twice ``dim * mult``, GEGLU, Linear back (indices 0 and 2)."""

    def __init__(self, dim: int, mult: int = 1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), GEGLU(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


class PrismCrossAttention(nn.Module):
    """The latents (LayerNorm ``x_norm``, ``to_q``) attend over the tiles (``to_kv``: keys, then values; the
    tiles are not normalised); ``to_out``; no biases."""

    def __init__(self, query_dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        if query_dim % heads:
            raise EncoderError(f"PRISM: latent width {query_dim} is not divisible by {heads} cross-attention heads")
        self.heads = heads
        inner = (query_dim // heads) * heads
        self.x_norm = nn.LayerNorm(query_dim)
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=False)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (B, heads, N, head_dim), of the tiles."""
        b, n, _ = context.shape
        k, v = self.to_kv(context).reshape(b, n, 2, self.heads, -1).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.to_q(self.x_norm(x)).reshape(b, n, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, *kv)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class PrismSelfAttention(nn.Module):
    """LayerNorm, then torch ``MultiheadAttention`` of the latents over themselves, without biases."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.mha(x, x, x, need_weights=False)[0]


class PrismPerceiver(nn.Module):
    """``Perceiver``: ``latents`` and ``layers``, each a ``ModuleDict`` of ``xattn`` (``xattn``, ``ff``) and ``tf``
    (a list of ``mhsa``, ``ff``), shared across layers as the authors share them."""

    def __init__(self, latents: int, dim: int, context_dim: int, mhsa_heads: int, depth: int, transformer_depth: int,
                 share_xattn_start: int, share_tf_start: int, xattn_heads: int, mlp_mult: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(latents, dim))
        layers: list[nn.ModuleDict] = []
        for i in range(depth):
            xattn = (nn.ModuleDict({"xattn": PrismCrossAttention(dim, context_dim, xattn_heads),
                                    "ff": PrismFeedForward(dim, mlp_mult)})
                     if i <= share_xattn_start else layers[-1]["xattn"])
            tf = (nn.ModuleList(nn.ModuleDict({"mhsa": PrismSelfAttention(dim, mhsa_heads),
                                               "ff": PrismFeedForward(dim, mlp_mult)})
                                for _ in range(transformer_depth))
                  if i <= share_tf_start else layers[-1]["tf"])
            layers.append(nn.ModuleDict({"xattn": xattn, "tf": tf}))
        self.layers = nn.ModuleList(layers)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        x = self.latents.unsqueeze(0).expand(context.shape[0], -1, -1)
        kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one per distinct cross-attention (shared W_k, W_v)
        for layer in self.layers:
            block = layer["xattn"]
            attend = block["xattn"]
            if id(attend) not in kv:
                kv[id(attend)] = attend.keys_values(context)
            x = x + attend(x, kv[id(attend)])
            x = x + block["ff"](x)
            for sa in layer["tf"]:
                x = x + sa["mhsa"](x)
                x = x + sa["ff"](x)
        return x


class PrismResampler(nn.Module):
    """``PerceiverResampler``: the Perceiver with one extra latent, whose output through ``cls_norm`` is the slide
    embedding; ``img_norm`` (the other latents', for the text decoder) is loaded but not used here."""

    def __init__(self, in_dim: int = 2560, latent_seq: int = 512, latent_dim: int = 1280, mhsa_heads: int = 8,
                 depth: int = 8, transformer_depth: int = 6, share_xattn_start: int = 1, share_tf_start: int = 0,
                 xattn_heads: int = 1, mlp_mult: int = 1) -> None:
        super().__init__()
        self.cls_norm = nn.LayerNorm(latent_dim)
        self.img_norm = nn.LayerNorm(latent_dim)
        self.perceiver = PrismPerceiver(1 + latent_seq, latent_dim, in_dim, mhsa_heads, depth, transformer_depth,
                                        share_xattn_start, share_tf_start, xattn_heads, mlp_mult)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.cls_norm(self.perceiver(tiles)[:, 0])


class PrismSlideEncoder(nn.Module):
    """``Prism`` without its text decoder and contrastive heads: ``image_resampler`` (the published keys'
    prefix). ``forward(features (1, N, 2560), cells)`` -> (1, 1280); positions are not used."""

    def __init__(self, in_dim: int = 2560, latent_seq: int = 512, latent_dim: int = 1280, mhsa_heads: int = 8,
                 depth: int = 8, transformer_depth: int = 6, share_xattn_start: int = 1, share_tf_start: int = 0,
                 xattn_heads: int = 1, mlp_mult: int = 1) -> None:
        super().__init__()
        self.image_resampler = PrismResampler(in_dim, latent_seq, latent_dim, mhsa_heads, depth, transformer_depth,
                                              share_xattn_start, share_tf_start, xattn_heads, mlp_mult)

    def forward(self, features: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        return self.image_resampler(features.to(self.image_resampler.perceiver.latents.dtype))
