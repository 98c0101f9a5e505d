"""Slide encoders: the registry, the architectures against their authors' code, strict loading, and a slide-level
view materialised from a TRIDENT import, searched by slide and used by heads.

The published layouts below are written from the authors' code (prov-gigapath/prov-gigapath
``gigapath/slide_encoder.py`` and torchscale's ``EncoderLayer`` / ``MultiheadAttention`` /
``FeedForwardNetwork`` with sub-LN; hms-dbmi/CHIEF ``models/CHIEF.py`` at size "small"; MahmoodLab/TITAN
``modeling_titan.py`` / ``vision_transformer.py`` / ``configuration_titan.py``; paige-ai/Prism ``modeling_prism.py`` /
``perceiver.py`` / ``configuring_prism.py``), not from HistCode's modules, so a wrong name or shape fails here. TITAN's
and PRISM's references compute the slide embedding step by step with plain tensor operations (the authors' dense
grid, meshgrid distances and ALiBi slopes; the Perceiver's layer loop with its shared modules). The references for the position embedding (MAE's
``get_2d_sincos_pos_embed`` over the whole grid) and for dilated attention (a loop over heads, positions and
branches) are written from the published algorithms independently of the code under test.
"""

from __future__ import annotations

import json

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from histcode.features.registry import FeatureView
from histcode.ssl.encoders import EncoderError
from histcode.ssl.foundation import FOUNDATION
from histcode.ssl.prism import PrismSlideEncoder
from histcode.ssl.slide_encoders import (
    SLIDE_ENCODERS,
    build_slide_encoder,
    dilated_attention,
    grid_cells,
    materialise,
    parameter_count,
    sincos_2d,
    slide_encoder_spec,
)
from histcode.ssl.titan import TitanSlideEncoder, alibi_slopes, tile_cells
from histcode.ssl.weights import load_slide_encoder, locate_weights, read_state_dict

runner = CliRunner()


# -- published layouts ---------------------------------------------------------------------------------------
def gigapath_published() -> dict[str, tuple[int, ...]]:
    """gigapath_slide_enc12l768d's state dict: LongNetViT(in_chans 1536, embed_dim 768, depth 12), LongNet_12_
    layers_768_dim (16 heads, ffn 3072), sub-LN; pos_embed is a non-persistent buffer (not in the file)."""
    d, f = 768, 3072
    shapes = {"cls_token": (1, 1, d), "patch_embed.proj.weight": (d, 1536), "patch_embed.proj.bias": (d,),
              "encoder.layer_norm.weight": (d,), "encoder.layer_norm.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(12):
        p = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"], shapes[p + f"self_attn.{proj}.bias"] = (d, d), (d,)
        for norm, width in (("self_attn.inner_attn_ln", d), ("self_attn_layer_norm", d), ("ffn.ffn_layernorm", f),
                            ("final_layer_norm", d)):
            shapes[p + norm + ".weight"], shapes[p + norm + ".bias"] = (width,), (width,)
        shapes.update({p + "ffn.fc1.weight": (f, d), p + "ffn.fc1.bias": (f,), p + "ffn.fc2.weight": (d, f),
                       p + "ffn.fc2.bias": (d,)})
    return shapes


def chief_published() -> dict[str, tuple[int, ...]]:
    """CHIEF(size_arg='small', dropout=True, n_classes=2): [768, 512, 256]; fc = Linear, ReLU, Dropout, gated
    attention (index 3); classifiers, instance classifiers, att_head, text_to_vision, organ_embedding buffer."""
    return {"attention_net.0.weight": (512, 768), "attention_net.0.bias": (512,),
            "attention_net.3.attention_a.0.weight": (256, 512), "attention_net.3.attention_a.0.bias": (256,),
            "attention_net.3.attention_b.0.weight": (256, 512), "attention_net.3.attention_b.0.bias": (256,),
            "attention_net.3.attention_c.weight": (1, 256), "attention_net.3.attention_c.bias": (1,),
            "classifiers.weight": (2, 512), "classifiers.bias": (2,),
            "instance_classifiers.0.weight": (2, 512), "instance_classifiers.0.bias": (2,),
            "instance_classifiers.1.weight": (2, 512), "instance_classifiers.1.bias": (2,),
            "att_head.fc1.weight": (256, 512), "att_head.fc1.bias": (256,), "att_head.fc2.weight": (1, 256),
            "att_head.fc2.bias": (1,), "text_to_vision.0.weight": (512, 768), "text_to_vision.0.bias": (512,),
            "organ_embedding": (19, 768)}


def chief_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in chief_published().items()}


def chief_reference(state: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """models/CHIEF.py forward's WSI_feature, by hand: A = W_c (tanh(W_a r) * sigmoid(W_b r)), r = ReLU(W_0 h);
    softmax of A over the tiles weights the original features h."""
    r = torch.relu(h @ state["attention_net.0.weight"].T + state["attention_net.0.bias"])
    a = torch.tanh(r @ state["attention_net.3.attention_a.0.weight"].T + state["attention_net.3.attention_a.0.bias"])
    b = torch.sigmoid(r @ state["attention_net.3.attention_b.0.weight"].T + state["attention_net.3.attention_b.0.bias"])
    scores = (a * b) @ state["attention_net.3.attention_c.weight"].T + state["attention_net.3.attention_c.bias"]
    return torch.softmax(scores[:, 0], dim=0) @ h


def titan_published(depth: int = 6, d: int = 768, in_dim: int = 768, queries: int = 128,
                    hidden: int = 3072) -> dict[str, tuple[int, ...]]:
    """``Titan(TitanConfig()).vision_encoder``: VisionTransformer(grid ALiBi, qkv_bias, attentional_pool
    'parallel'); blocks in CustomSequential's ``modules_list``; timm Mlp fc1/fc2; AttentionalPooler = query,
    nn.MultiheadAttention (in_proj_*, out_proj), ln_q, ln_k; ``proj``. The ALiBi tables are plain attributes and
    fc_norm/head/ls are Identity: none is in the file."""
    p = "vision_encoder."
    shapes = {p + "cls_token": (1, 1, d), p + "proj": (d, d), p + "patch_embed.0.weight": (d, in_dim),
              p + "patch_embed.0.bias": (d,), p + "norm.weight": (d,), p + "norm.bias": (d,)}
    for i in range(depth):
        b = f"{p}blocks.modules_list.{i}."
        for norm in ("norm1", "norm2"):
            shapes[b + norm + ".weight"], shapes[b + norm + ".bias"] = (d,), (d,)
        shapes.update({b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d),
                       b + "attn.proj.bias": (d,), b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
                       b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)})
    for pool, n in (("attn_pool", queries), ("attn_pool_contrastive", 1)):
        q = f"{p}{pool}."
        shapes.update({q + "query": (n, d), q + "attn.in_proj_weight": (3 * d, d), q + "attn.in_proj_bias": (3 * d,),
                       q + "attn.out_proj.weight": (d, d), q + "attn.out_proj.bias": (d,)})
        for norm in ("ln_q", "ln_k"):
            shapes[q + norm + ".weight"], shapes[q + norm + ".bias"] = (d,), (d,)
    return shapes


def prism_published(depth: int = 8, tf_depth: int = 6, d: int = 1280, ctx: int = 2560, latents: int = 513,
                    every_layer: bool = True) -> dict[str, tuple[int, ...]]:
    """``Prism(...).image_resampler``: PerceiverResampler (cls_norm, img_norm, perceiver.latents of 1 + 512),
    Perceiver layers = ModuleDict(xattn = {xattn: CrossAttention(x_norm, to_q, to_kv, to_out; no biases, no
    c_norm), ff: FeedForward(norm, net.0, GEGLU, net.2)}, tf = [{mhsa: MHSA(norm, mha without biases), ff}]);
    layers > 1 reuse layer 1's xattn, layers > 0 layer 0's tf (share_xattn_start_layer=1, share_tf_start_layer=0).
    ``every_layer``: every layer's names (torch's state dict); else each shared module under its first layer."""
    p = "image_resampler."
    shapes = {p + "cls_norm.weight": (d,), p + "cls_norm.bias": (d,), p + "img_norm.weight": (d,),
              p + "img_norm.bias": (d,), p + "perceiver.latents": (latents, d)}

    def ff(pre: str) -> dict[str, tuple[int, ...]]:
        return {pre + "norm.weight": (d,), pre + "norm.bias": (d,), pre + "net.0.weight": (2 * d, d),
                pre + "net.0.bias": (2 * d,), pre + "net.2.weight": (d, d), pre + "net.2.bias": (d,)}

    for i in range(depth):
        layer = f"{p}perceiver.layers.{i}."
        if every_layer or i <= 1:
            x = layer + "xattn.xattn."
            shapes.update({x + "x_norm.weight": (d,), x + "x_norm.bias": (d,), x + "to_q.weight": (d, d),
                           x + "to_kv.weight": (2 * d, ctx), x + "to_out.weight": (d, d), **ff(layer + "xattn.ff.")})
        if every_layer or i == 0:
            for j in range(tf_depth):
                t = f"{layer}tf.{j}."
                shapes.update({t + "mhsa.norm.weight": (d,), t + "mhsa.norm.bias": (d,),
                               t + "mhsa.mha.in_proj_weight": (3 * d, d), t + "mhsa.mha.out_proj.weight": (d, d),
                               **ff(t + "ff.")})
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}


def _ln(x: torch.Tensor, state: dict, name: str, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * state[name + ".weight"] + state[name + ".bias"]


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias=None) -> torch.Tensor:
    """Per head h: softmax(q_h k_h^T / sqrt(d_h) + bias_h) v_h, heads concatenated; (n, D), (m, D), (m, D)."""
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        scores = q[:, part] @ k[:, part].T / math.sqrt(d) + (0 if bias is None else bias[h])
        weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
        outs.append((weights / weights.sum(-1, keepdim=True)) @ v[:, part])
    return torch.cat(outs, dim=-1)


def titan_reference(state: dict, feats: torch.Tensor, coords: torch.Tensor, patch_px: int, depth: int, heads: int,
                    pool_heads: int, slopes: list[float]) -> torch.Tensor:
    """vision_transformer.py forward(no_proj=True) for one slide: preprocess_features' dense (H, W) grid of
    (coords - min) // patch_size_lv0 (H along x), tiles of a cell summed, cells of all-zero features dropped;
    get_alibi's meshgrid(arange(w), arange(h), 'ij') distances; blocks; norm; the contrastive pooler."""
    p = "vision_encoder."
    grid_xy = torch.div(coords - coords.min(0).values, patch_px, rounding_mode="floor")
    h_, w_ = (grid_xy.max(0).values + 1).tolist()
    grid = torch.zeros(h_ * w_, feats.shape[1])
    for (gx, gy), f in zip(grid_xy.tolist(), feats):
        grid[gx * w_ + gy] += f
    keep = (grid != 0).any(-1)
    ii, jj = np.meshgrid(np.arange(h_), np.arange(w_), indexing="ij")
    points = torch.tensor(np.stack([ii.ravel(), jj.ravel()], 1), dtype=torch.float32)[keep]
    n = len(points) + 1
    bias = torch.zeros(heads, n, n)
    for a in range(1, n):
        for b in range(1, n):
            dist = math.sqrt(float(((points[a - 1] - points[b - 1]) ** 2).sum()))
            bias[:, a, b] = -torch.tensor(slopes) * dist
    x = _gelu(grid[keep] @ state[p + "patch_embed.0.weight"].T + state[p + "patch_embed.0.bias"])
    x = torch.cat([state[p + "cls_token"][0], x])
    for i in range(depth):
        b = f"{p}blocks.modules_list.{i}."
        qkv = _ln(x, state, b + "norm1", 1e-6) @ state[b + "attn.qkv.weight"].T + state[b + "attn.qkv.bias"]
        q, k, v = qkv.chunk(3, dim=-1)
        x = x + _attend(q, k, v, heads, bias) @ state[b + "attn.proj.weight"].T + state[b + "attn.proj.bias"]
        hidden = _gelu(_ln(x, state, b + "norm2", 1e-6) @ state[b + "mlp.fc1.weight"].T + state[b + "mlp.fc1.bias"])
        x = x + hidden @ state[b + "mlp.fc2.weight"].T + state[b + "mlp.fc2.bias"]
    x = _ln(x, state, p + "norm", 1e-6)
    pool = p + "attn_pool_contrastive."
    query, kv = _ln(state[pool + "query"], state, pool + "ln_q"), _ln(x, state, pool + "ln_k")
    wq, wk, wv = state[pool + "attn.in_proj_weight"].chunk(3)
    bq, bk, bv = state[pool + "attn.in_proj_bias"].chunk(3)
    out = _attend(query @ wq.T + bq, kv @ wk.T + bk, kv @ wv.T + bv, pool_heads)
    return (out @ state[pool + "attn.out_proj.weight"].T + state[pool + "attn.out_proj.bias"])[0]


def prism_reference(state: dict, tiles: torch.Tensor, depth: int, tf_depth: int, mhsa_heads: int) -> torch.Tensor:
    """perceiver.py forward for one slide (no mask), from the first-name state: layer i's cross-attention block is
    layer min(i, 1)'s, its self-attention blocks layer 0's; then cls_norm of the first latent."""
    p = "image_resampler.perceiver."

    def ff(x: torch.Tensor, pre: str) -> torch.Tensor:
        a = _ln(x, state, pre + "norm") @ state[pre + "net.0.weight"].T + state[pre + "net.0.bias"]
        value, gate = a.chunk(2, dim=-1)
        return (value * _gelu(gate)) @ state[pre + "net.2.weight"].T + state[pre + "net.2.bias"]

    x = state[p + "latents"]
    for i in range(depth):
        block = f"{p}layers.{min(i, 1)}.xattn."
        q = _ln(x, state, block + "xattn.x_norm") @ state[block + "xattn.to_q.weight"].T
        k, v = (tiles @ state[block + "xattn.to_kv.weight"].T).chunk(2, dim=-1)
        x = x + _attend(q, k, v, 1) @ state[block + "xattn.to_out.weight"].T
        x = x + ff(x, block + "ff.")
        for j in range(tf_depth):
            t = f"{p}layers.0.tf.{j}."
            h = _ln(x, state, t + "mhsa.norm")
            wq, wk, wv = state[t + "mhsa.mha.in_proj_weight"].chunk(3)
            x = x + _attend(h @ wq.T, h @ wk.T, h @ wv.T, mhsa_heads) @ state[t + "mhsa.mha.out_proj.weight"].T
            x = x + ff(x, t + "ff.")
    return _ln(x[0], state, "image_resampler.cls_norm")


TINY_TITAN = {"embed_dim": 12, "depth": 2, "heads": 6, "mlp_ratio": 2.0, "pool_heads": 2, "pool_queries": 3}
TINY_PRISM = {"latent_seq": 3, "latent_dim": 8, "mhsa_heads": 2, "depth": 3, "transformer_depth": 2,
              "share_xattn_start": 1, "share_tf_start": 0, "xattn_heads": 1, "mlp_mult": 1}


def tiny_titan_state(in_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_state(titan_published(2, 12, in_dim, 3, 24), seed)


def tiny_prism_state(in_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_state(prism_published(3, 2, 8, in_dim, 4, every_layer=False), seed)


# -- the registry ----------------------------------------------------------------------------------------------
def test_the_registry_names_each_slide_encoder_s_tile_encoder_and_says_why_it_refuses_one() -> None:
    assert {"titan", "prism", "prov-gigapath-slide", "chief"} <= set(SLIDE_ENCODERS)
    for spec in SLIDE_ENCODERS.values():
        assert spec.tile_encoder in FOUNDATION and FOUNDATION[spec.tile_encoder].dim == spec.in_dim, spec.name
        assert spec.licence and spec.card.startswith("https://") and spec.weight_files
    assert slide_encoder_spec("titan").tile_encoder == "conch-v1.5" and slide_encoder_spec("titan").patch_um == 256
    assert slide_encoder_spec("prism").tile_encoder == "virchow" and FOUNDATION["virchow"].dim == 2560
    assert slide_encoder_spec("prov-gigapath-slide").patch_um == 128
    assert "non-commercial academic" in slide_encoder_spec("chief").licence
    assert slide_encoder_spec("titan").tile_grid and slide_encoder_spec("titan").skipped == ("text_encoder.",)
    assert not any(spec.refused for spec in SLIDE_ENCODERS.values())
    with pytest.raises(EncoderError, match="unknown slide encoder 'nope'"):
        slide_encoder_spec("nope")


def test_a_refused_entry_raises_its_reason_instead_of_building(monkeypatch) -> None:
    monkeypatch.setitem(SLIDE_ENCODERS, "chief", replace(slide_encoder_spec("chief"), refused="its terms say no"))
    with pytest.raises(EncoderError, match=r"slide encoder chief \(CHIEF \(slide embedding\)\) is listed but not "
                                           "built: its terms say no"):
        build_slide_encoder("chief")


# -- Prov-GigaPath -------------------------------------------------------------------------------------------
def test_gigapath_builds_on_meta_with_the_published_keys_and_parameter_count() -> None:
    spec = slide_encoder_spec("prov-gigapath-slide")
    module = build_slide_encoder(spec.name, weightless=True)
    published = gigapath_published()
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == published
    counted = sum(int(np.prod(s)) for s in published.values())
    assert counted / 1e6 == pytest.approx(86.3, rel=0.005)  # the authors' demo prints 86.3M for enc12l768d
    assert parameter_count(module) == counted
    state = {k: torch.empty(s, device="meta") for k, s in published.items()}
    load_slide_encoder(spec, module, state, "published gigapath")
    out = module(torch.empty(1, 5, 1536, device="meta"), torch.zeros(1, 5, 2, dtype=torch.long, device="meta"))
    assert tuple(out.shape) == (1, 768)


def test_gigapath_position_embedding_is_mae_s_sincos_table_indexed_as_coords_to_pos() -> None:
    """MAE: meshgrid(w, h) with w first, stacked; half the dimensions from grid[0], half from grid[1]; GigaPath's
    index of a tile at cell (column c, row r) is c * ngrids + r (plus 1 for the class token, row 0 of zeros)."""
    dim, n = 8, 6
    gw, gh = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32))

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=float) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)  # (n*n, dim)
    cells = torch.tensor([[[0, 0], [1, 0], [0, 1], [5, 3], [2, 4]]])
    want = table[(cells[0, :, 0] * n + cells[0, :, 1]).numpy()]
    assert np.allclose(sincos_2d(cells, dim, n)[0].numpy(), want, atol=1e-6)


def test_tile_corners_become_cells_of_the_encoder_s_pitch() -> None:
    x_um, y_um = np.array([0.0, 128.0, 255.99999, 384.0]), np.array([0.0, 0.0, 128.0, 1280.0])
    assert grid_cells(x_um, y_um, 128.0)[0].tolist() == [[0, 0], [1, 0], [2, 1], [3, 10]]
    assert grid_cells(x_um, y_um, None).abs().sum() == 0


def _dilated_reference(q, k, v, segments, dilations) -> torch.Tensor:
    """Per head h and position p: for each branch (w, r), segment length s = min(w, L) and segments padded to
    m * r; the head's group g = h // (H / r) sees the branch only at local positions j = p % s with j % r == g,
    attending over the keys of its segment at local positions j' % r == g (zero beyond the sequence or the
    segment); branches merged by the softmax of their log-sum-exp."""
    _, length, heads, d = q.shape
    out = torch.zeros_like(q)
    for h in range(heads):
        for p in range(length):
            parts = []
            for w, r in zip(segments, dilations):
                s = min(w, length)
                m = -(-s // r)
                g, j, start = h // (heads // r), p % s, (p // s) * s
                if j % r != g:
                    continue
                keys, values = [], []
                for jj in range(g, m * r, r):
                    pos = start + jj
                    inside = jj < s and pos < length
                    keys.append(k[0, pos, h] if inside else torch.zeros(d))
                    values.append(v[0, pos, h] if inside else torch.zeros(d))
                scores = torch.stack(keys) @ q[0, p, h] / d ** 0.5
                parts.append((torch.logsumexp(scores, 0), torch.softmax(scores, 0) @ torch.stack(values)))
            lse = torch.stack([a for a, _ in parts])
            out[0, p, h] = sum(wt * o for wt, (_, o) in zip(torch.softmax(lse, 0), parts))
    return out


@pytest.mark.parametrize("length", [5, 9])
def test_dilated_attention_is_longnet_s(length: int) -> None:
    torch.manual_seed(length)
    q, k, v = (torch.randn(1, length, 4, 3) for _ in range(3))
    segments, dilations = (4, 8, 16), (1, 2, 4)
    got = dilated_attention(q, k, v, segments, dilations)
    assert torch.allclose(got, _dilated_reference(q, k, v, segments, dilations), atol=1e-5)


def test_gigapath_with_random_weights_embeds_a_few_tiles_at_full_size() -> None:
    module = materialise(build_slide_encoder("prov-gigapath-slide", weightless=True)).eval()
    features = torch.randn(1, 6, 1536)
    cells = torch.tensor([[[3, 4], [4, 4], [3, 5], [10, 2], [0, 0], [7, 7]]])
    with torch.inference_mode():
        out = module(features, cells)
        moved = module(features, cells.flip(-1))  # positions matter
    assert out.shape == (1, 768) and torch.isfinite(out).all() and not torch.allclose(out, moved)
    with pytest.raises(EncoderError, match=r"tile cells must lie in \[0, 1000\)"):
        module(features, cells + 995)


# -- CHIEF and strict loading ----------------------------------------------------------------------------------
def test_chief_loads_its_published_file_strictly_and_embeds_as_its_code_does(tmp_path) -> None:
    from histcode.features.slide_embed import load_slide_module

    spec = slide_encoder_spec("chief")
    state = chief_state()
    torch.save(state, tmp_path / "CHIEF_pretraining.pth")
    module, path, sha = load_slide_module(spec, tmp_path)
    assert path == tmp_path / "CHIEF_pretraining.pth" and len(sha) == 64
    assert parameter_count(module) / 1e6 == pytest.approx(spec.params_m, rel=0.01)
    h = torch.randn(7, 768)
    with torch.inference_mode():
        assert torch.allclose(module(h[None])[0], chief_reference(state, h), atol=1e-5)

    broken = dict(state)
    del broken["attention_net.3.attention_c.bias"]
    broken["attention_net.9.weight"] = torch.zeros(3)
    broken["attention_net.0.weight"] = torch.zeros(512, 1024)
    with pytest.raises(EncoderError, match=r"bad.pth does not fit slide encoder CHIEF .*1 missing \(attention_net\.3\.attention_c\.bias\)"
                                           r".*1 unexpected \(attention_net\.9\.weight\).*attention_net\.0\.weight \(512, 1024\) \(expects \(512, 768\)\)"):
        load_slide_encoder(spec, build_slide_encoder("chief", weightless=True), broken, "bad.pth")
    with pytest.raises(EncoderError, match=r"CHIEF \(slide embedding\) weights not found: .*none.* does not exist\. "
                                           r"Looked for CHIEF_pretraining\.pth"):
        locate_weights(spec, tmp_path / "none")


def test_a_view_of_another_tile_encoder_is_refused_by_name() -> None:
    from histcode.features.slide_embed import check_source

    spec = slide_encoder_spec("chief")
    kaiko = FeatureView("fv-a", "histcode-encoder", "1", "foundation:kaiko-vit-s16", 384, "ts-1", 224)
    with pytest.raises(EncoderError, match="slide encoder chief .* reads ctranspath tile features .* view fv-a was made "
                                           "by foundation:kaiko-vit-s16"):
        check_source(spec, kaiko)
    uni = FeatureView("fv-b", "trident:uni_v1", "i1", "imported:trident", 768, "ts-1", 256)
    with pytest.raises(EncoderError, match="view fv-b was made by trident:uni_v1"):
        check_source(spec, uni)
    ours = FeatureView("fv-c", "trident:ctranspath", "i1", "imported:trident", 512, "ts-1", 256)
    with pytest.raises(EncoderError, match="reads 768-d tile features; view fv-c holds 512-d"):
        check_source(spec, ours)
    check_source(spec, FeatureView("fv-d", "histcode-encoder", "2", "foundation:ctranspath", 768, "ts-1", 224))


# -- TITAN -----------------------------------------------------------------------------------------------------
def test_titan_builds_on_meta_with_the_vision_tower_s_published_keys_and_skips_the_text_tower() -> None:
    spec = slide_encoder_spec("titan")
    module = build_slide_encoder("titan", weightless=True)
    published = titan_published()
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == published
    assert parameter_count(module) == sum(int(np.prod(s)) for s in published.values())
    assert parameter_count(module) / 1e6 == pytest.approx(spec.params_m, abs=0.05)
    state = {k: torch.empty(s, device="meta") for k, s in published.items()}
    state["text_encoder.transformer.resblocks.0.attn.in_proj_weight"] = torch.empty(2304, 768, device="meta")
    load_slide_encoder(spec, module, state, "published titan")


def test_titan_s_alibi_slopes_are_the_authors_get_slopes() -> None:
    """get_slopes(12): the 8 of 2^(-8/8) = 1/2, then every other one of 16's (2^-0.5, ...) up to 12; (6): 4 of
    1/4, then 8's 1/2 and 1/8."""
    assert alibi_slopes(12) == pytest.approx([2.0 ** -k for k in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5])
    assert alibi_slopes(6) == pytest.approx([1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8])
    assert alibi_slopes(8) == pytest.approx([2.0 ** -k for k in range(1, 9)])


def test_titan_places_tiles_on_its_grid_from_their_level0_corners() -> None:
    """(corner - smallest corner) // patch_size_lv0: x from 100, y from 50, tiles of 512 px."""
    x, y = np.array([100, 612, 1124, 100, 700]), np.array([50, 50, 562, 1586, 100])
    assert tile_cells(x, y, 512)[0].tolist() == [[0, 0], [1, 0], [2, 1], [0, 3], [1, 0]]
    with pytest.raises(EncoderError, match="positive tile size"):
        tile_cells(x, y, 0)


def test_titan_loads_strictly_and_embeds_as_its_authors_code_does(tmp_path) -> None:
    spec = slide_encoder_spec("titan")
    state = tiny_titan_state(8)
    save_file({**state, "text_encoder.token_embedding.weight": torch.zeros(5, 12)}, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        module = TitanSlideEncoder(8, **TINY_TITAN)
    load_slide_encoder(spec, module, read_state_dict(tmp_path / "model.safetensors"), "tiny titan")
    module.eval()
    g = torch.Generator().manual_seed(3)
    coords = torch.tensor([[100, 50], [612, 50], [1124, 562], [100, 1586], [700, 100], [1636, 1074]])
    feats = torch.randn(6, 8, generator=g)
    feats[5] = 0  # a background cell: dropped
    want = titan_reference(state, feats, coords, 512, 2, 6, 2, alibi_slopes(6))
    with torch.inference_mode():
        got = module(feats[None], tile_cells(coords[:, 0].numpy(), coords[:, 1].numpy(), 512))[0]
        moved = module(feats[None], tile_cells(coords[:, 1].numpy(), coords[:, 0].numpy() * 3, 512))[0]
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert not torch.allclose(got, moved, atol=1e-4)  # the distances between cells matter

    broken = dict(state)
    del broken["vision_encoder.blocks.modules_list.1.attn.qkv.bias"]
    broken["vision_encoder.pos_embed"] = torch.zeros(1, 197, 12)
    broken["conch.trunk.cls_token"] = torch.zeros(1, 1, 12)
    with pytest.raises(EncoderError, match=r"bad.safetensors does not fit slide encoder TITAN .*1 missing "
                                           r"\(vision_encoder\.blocks\.modules_list\.1\.attn\.qkv\.bias\).*2 unexpected "
                                           r"\(conch\.trunk\.cls_token, vision_encoder\.pos_embed\)"):
        with torch.device("meta"):
            load_slide_encoder(spec, TitanSlideEncoder(8, **TINY_TITAN), broken, "bad.safetensors")


def test_titan_with_random_weights_embeds_a_few_tiles_at_full_size() -> None:
    module = materialise(build_slide_encoder("titan", weightless=True)).eval()
    with torch.inference_mode():
        out = module(torch.randn(1, 5, 768), torch.tensor([[[0, 0], [1, 0], [2, 1], [0, 3], [7, 7]]]))
    assert out.shape == (1, 768) and torch.isfinite(out).all()
    with pytest.raises(EncoderError, match="every tile's features are zero"):
        module(torch.zeros(1, 2, 768), torch.tensor([[[0, 0], [1, 0]]]))


# -- PRISM -----------------------------------------------------------------------------------------------------
def test_prism_builds_on_meta_with_the_resampler_s_published_keys_shared_as_the_authors_share_them() -> None:
    spec = slide_encoder_spec("prism")
    module = build_slide_encoder("prism", weightless=True)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == prism_published()
    first_names = prism_published(every_layer=False)
    assert parameter_count(module) == sum(int(np.prod(s)) for s in first_names.values())
    assert parameter_count(module) / 1e6 == pytest.approx(spec.params_m, abs=0.05)
    extra = {"text_decoder.model.biogpt.embed_tokens.weight": (42384, 1280), "img_to_latents.to_latents.weight": (5120, 1280),
             "text_to_latents.to_latents.weight": (5120, 1280), "temperature": ()}
    state = {k: torch.empty(s, device="meta") for k, s in {**first_names, **extra}.items()}
    load_slide_encoder(spec, module, state, "published prism")  # each shared module stored once, as safetensors does
    out = module(torch.empty(1, 7, 2560, device="meta"))
    assert tuple(out.shape) == (1, 1280)


def test_prism_loads_strictly_and_embeds_as_its_authors_code_does(tmp_path) -> None:
    spec = slide_encoder_spec("prism")
    state = tiny_prism_state(12)
    save_file({**state, "temperature": torch.tensor(2.6), "text_decoder.lm_head.weight": torch.zeros(3, 8)},
              str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        module = PrismSlideEncoder(12, **TINY_PRISM)
    load_slide_encoder(spec, module, read_state_dict(tmp_path / "model.safetensors"), "tiny prism")
    module.eval()
    tiles = torch.randn(9, 12, generator=torch.Generator().manual_seed(4))
    want = prism_reference(state, tiles, 3, 2, 2)
    with torch.inference_mode():
        got = module(tiles[None])[0]
        shuffled = module(tiles[torch.randperm(9)][None])[0]
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert torch.allclose(got, shuffled, atol=1e-5)  # a set of tiles: positions unused

    every = module.state_dict()  # torch.save keeps every layer's name of a shared module: that loads too
    with torch.device("meta"):
        again = PrismSlideEncoder(12, **TINY_PRISM)
    load_slide_encoder(spec, again, dict(every), "every name")
    with torch.inference_mode():
        assert torch.allclose(again.eval()(tiles[None])[0], want, atol=1e-5)
    clash = dict(every)
    clash["image_resampler.perceiver.layers.2.xattn.xattn.to_q.weight"] = torch.zeros(8, 8)
    with pytest.raises(EncoderError, match=r"layers\.2\.xattn\.xattn\.to_q\.weight differs from "
                                           r"image_resampler\.perceiver\.layers\.1\.xattn\.xattn\.to_q\.weight"):
        load_slide_encoder(spec, PrismSlideEncoder(12, **TINY_PRISM), clash, "clash")
    broken = dict(state)
    del broken["image_resampler.perceiver.layers.0.tf.1.ff.net.2.bias"]
    broken["image_resampler.perceiver.layers.0.xattn.xattn.c_norm.weight"] = torch.zeros(12)
    with pytest.raises(EncoderError, match=r"does not fit slide encoder PRISM .*3 missing "  # under each layer's name
                                           r"\(image_resampler\.perceiver\.layers\.0\.tf\.1\.ff\.net\.2\.bias, .*1 unexpected "
                                           r"\(image_resampler\.perceiver\.layers\.0\.xattn\.xattn\.c_norm\.weight\)"):
        load_slide_encoder(spec, PrismSlideEncoder(12, **TINY_PRISM), broken, "bad")


# -- end to end ------------------------------------------------------------------------------------------------
def import_trident(ws, root, encoder: str, dim: int, patch_px: int, seed: int, every: int = 1):
    """TRIDENT features of up to 6 patches per slide (of ``patch_px`` at 20x; every ``every``-th grid position,
    from a corner off the origin when ``every`` > 1) imported into ``ws``; returns the tile view."""
    import h5py

    from histcode.exchange.importing import import_features
    from histcode.store.catalog import Catalog

    folder = root / "trident" / f"20x_{patch_px}px_0px_overlap" / f"features_{encoder}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for s in Catalog.of(ws).slides("ok"):
        mag = int(round(10 / s["mpp_x"]))
        size = patch_px * mag // 20
        start = 0 if every == 1 else 37
        coords = np.array([(x, y) for y in range(start, int(s["height"]) - size + 1, size)
                           for x in range(start, int(s["width"]) - size + 1, size)][::every][:6], dtype=np.int64)
        with h5py.File(folder / f"{s['slide_id']}.h5", "w") as f:
            feats = f.create_dataset("features", data=rng.normal(size=(len(coords), dim)).astype(np.float32))
            feats.attrs.update({"name": s["slide_id"], "encoder": encoder})
            xy = f.create_dataset("coords", data=coords)
            xy.attrs.update({"patch_size": patch_px, "patch_size_level0": size, "level0_magnification": mag,
                             "target_magnification": 20, "overlap": 0, "name": s["slide_id"],
                             "level0_width": s["width"], "level0_height": s["height"]})
    report = import_features(ws, ws.config(), "trident", folder)
    assert not report.failed, report.as_rows()
    return report.view


@pytest.fixture(scope="module")
def chief_workspace(heads_cohort, tmp_path_factory):
    """The heads cohort tiled, CTransPath features of 6 patches per slide imported from TRIDENT files, and a
    CHIEF checkpoint (random weights in the published layout) on disk."""
    from histcode.store.catalog import Catalog

    from tests.conftest import TINY_HEADS, _tile_cohort

    root = tmp_path_factory.mktemp("chief")
    ws = _tile_cohort(heads_cohort, root)
    (ws.root / "params.yaml").write_text(yaml.safe_dump({"labels": {"min_class_size": 2, "folds": 3}, "heads": TINY_HEADS}))
    view = import_trident(ws, root, "ctranspath", 768, 256, seed=0)
    torch.save(chief_state(1), root / "CHIEF_pretraining.pth")
    return ws, view, root / "CHIEF_pretraining.pth", len(Catalog.of(ws).slides("ok"))


def test_a_slide_encoder_s_vectors_become_a_view_that_slide_search_and_heads_use(chief_workspace, heads_cohort) -> None:
    from histcode.heads.cv import cross_validate
    from histcode.heads.tasks import task_data
    from histcode.cli import app
    from histcode.features.read import slide_features, tile_features, view_table
    from histcode.features.registry import ViewError, list_views, load_view
    from histcode.heads.data import load_bags
    from histcode.labels.run import gate_labels, ingest_labels
    from histcode.store.catalog import Catalog
    from histcode.store.vectors import TILE_KIND

    ws, tiles_view, weights, n_slides = chief_workspace
    args = ["--workspace", str(ws.root), "encoders", "embed-slides", "chief", "--view", tiles_view.view_id,
            "--weights", str(weights), "--format", "json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    made = json.loads(first.output.strip().splitlines()[-1])
    assert (made["embedded"], made["skipped"], made["failed"], made["source_view_id"]) == (n_slides, 0, [], tiles_view.view_id)
    again = json.loads(runner.invoke(app, args).output.strip().splitlines()[-1])
    assert (again["embedded"], again["skipped"], again["view_id"]) == (0, n_slides, made["view_id"])  # resumable, idempotent

    catalog = Catalog.of(ws)
    view = load_view(catalog, made["view_id"])
    assert view.slide_level and view.dim == 768 and view.source_view_id == tiles_view.view_id
    assert made["view_id"] in {r["view_id"] for r in list_views(catalog)}
    slides = slide_features(ws, view, fmt="pandas")
    assert len(slides) == n_slides and set(slides.n_tiles) == {6}
    state = chief_state(1)
    one = slides.slide_id.iloc[0]
    h = torch.from_numpy(np.stack(tile_features(ws, tiles_view, slide_ids=[one], fmt="pandas").vector.to_list()))
    assert np.allclose(slides.vector.iloc[0], chief_reference(state, h.float()).numpy(), atol=1e-4)
    with pytest.raises(ViewError, match=f"no tile vectors; tiles are in the view it was computed from, {tiles_view.view_id}"):
        view_table(ws, view, TILE_KIND)

    hits = runner.invoke(app, ["--workspace", str(ws.root), "search", "--slide", one, "--view", view.view_id, "--k", "3",
                               "--format", "json"])
    assert hits.exit_code == 0, hits.output
    assert len([line for line in hits.output.strip().splitlines() if line.startswith("{")]) == 3
    tile = runner.invoke(app, ["--workspace", str(ws.root), "search", "--tile", "x", "--view", view.view_id])
    assert tile.exit_code == 2 and "search it by slide" in " ".join(tile.output.split())

    bags = load_bags(ws, view)
    assert len(bags) == n_slides and {b.features.shape for b in bags.values()} == {(1, 768)}
    assert np.allclose(bags[one].features[0], slides.vector.iloc[0])
    ingest_labels(ws, ws.config(), heads_cohort.out_dir / "expression.tsv")
    assert gate_labels(ws, ws.config()).passed
    data = task_data(catalog, "tumor", bags)
    for aggregator in ("mean", "attention"):  # a linear probe on the slide embedding; attention over its one vector
        result = cross_validate(data, bags, aggregator, ws.config().heads)
        assert np.isfinite(result.score), aggregator

    wrong = runner.invoke(app, ["--workspace", str(ws.root), "encoders", "embed-slides", "prov-gigapath-slide", "--view",
                                tiles_view.view_id, "--weights", str(weights)])
    assert wrong.exit_code == 2
    assert "reads prov-gigapath tile features" in " ".join(wrong.output.split())
    assert "was made by trident:ctranspath" in " ".join(wrong.output.split())
    listed = runner.invoke(app, ["--workspace", str(ws.root), "encoders", "list", "--format", "json"]).output
    listing = json.loads(listed[listed.index('{\n "foundation"'):])
    assert [e["name"] for e in listing["slide"]] == list(SLIDE_ENCODERS)


@pytest.mark.parametrize("name", ["titan", "prism"])
def test_titan_and_prism_embed_slides_from_their_tile_encoder_s_view(name, chief_workspace, tmp_path, monkeypatch) -> None:
    """`embed-slides` end to end at a tiny width (the registry's entry with tiny args; the tile widths are the
    real ones): TITAN over CONCH v1.5 features of 512-px tiles placed on its grid from the stored corners, PRISM
    over Virchow's 2560-d ones; each slide's vector is the reference's; a view of the other encoder is refused."""
    from histcode.cli import app
    from histcode.features.read import slide_features, tile_features

    ws, chief_view, _, n_slides = chief_workspace
    titan = name == "titan"
    encoder, dim, patch_px = ("conch_v15", 768, 512) if titan else ("virchow", 2560, 224)
    tiles_view = import_trident(ws, tmp_path, encoder, dim, patch_px, seed=5, every=2)
    spec = slide_encoder_spec(name)
    monkeypatch.setitem(SLIDE_ENCODERS, name, replace(spec, args=TINY_TITAN if titan else TINY_PRISM,
                                                      dim=12 if titan else 8))
    state = tiny_titan_state(dim, seed=2) if titan else tiny_prism_state(dim, seed=2)
    save_file({**state, **({"text_encoder.ln_final.weight": torch.ones(12)} if titan else {"temperature": torch.tensor(1.0)})},
              str(tmp_path / "model.safetensors"))
    args = ["--workspace", str(ws.root), "encoders", "embed-slides", name, "--view", tiles_view.view_id,
            "--weights", str(tmp_path), "--format", "json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    made = json.loads(result.output.strip().splitlines()[-1])
    assert (made["embedded"], made["failed"], made["dim"]) == (n_slides, [], 12 if titan else 8)

    slides = slide_features(ws, made["view_id"], fmt="pandas")
    one = slides.slide_id.iloc[0]
    tiles = tile_features(ws, tiles_view, slide_ids=[one], fmt="pandas")
    h = torch.from_numpy(np.stack(tiles.vector.to_list())).float()
    assert len(tiles) >= 3  # TITAN: cells (0, 0), (2, 0), (1, 1) of 512-px tiles from corner (37, 37)
    if titan:
        coords = torch.from_numpy(np.stack([tiles.x.to_numpy(), tiles.y.to_numpy()], 1).astype(np.int64))
        want = titan_reference(state, h, coords, int(tiles["size"].iloc[0]), 2, 6, 2, alibi_slopes(6))
    else:
        want = prism_reference(state, h, 3, 2, 2)
    assert np.allclose(slides.vector.iloc[0], want.numpy(), atol=1e-4)

    wrong = runner.invoke(app, ["--workspace", str(ws.root), "encoders", "embed-slides", name, "--view",
                                chief_view.view_id, "--weights", str(tmp_path)])
    assert wrong.exit_code == 2
    told = " ".join(wrong.output.split())
    assert f"reads {spec.tile_encoder} tile features" in told and "was made by trident:ctranspath" in told


def test_heads_on_a_slide_encoder_s_view_predict_without_tile_maps(chief_workspace, heads_cohort, tmp_path) -> None:
    """Heads registered on a slide-level view: a heatmap is refused (one vector per slide, no tiles to draw on),
    and `histcode predict` names what it needs: the tile view's features were imported, so HistCode cannot embed
    a new slide in it; with a HistCode tile view, the slide encoder's weights (`--slide-weights NAME=PATH`)."""
    from histcode.apps.heatmaps import render_heatmaps
    from histcode.apps.predict import _encode_slides
    from histcode.apps.train_heads import train_heads
    from histcode.cli import app
    from histcode.features.registry import load_view
    from histcode.heads.apply import load_head
    from histcode.labels.run import gate_labels, ingest_labels
    from histcode.store.catalog import Catalog
    from histcode.tracking import Tracker

    ws, tiles_view, weights, _ = chief_workspace
    made = runner.invoke(app, ["--workspace", str(ws.root), "encoders", "embed-slides", "chief", "--view",
                               tiles_view.view_id, "--weights", str(weights), "--format", "json"])
    view_id = json.loads(made.output.strip().splitlines()[-1])["view_id"]
    ingest_labels(ws, ws.config(), heads_cohort.out_dir / "expression.tsv")
    assert gate_labels(ws, ws.config()).passed
    cfg = ws.config()
    cfg = cfg.model_copy(update={"heads": cfg.heads.model_copy(update={"aggregators": ("attention", "mean")})})
    report = train_heads(ws, cfg, tasks=("tumor",), view_id=view_id)
    assert report.best["tumor"] in {"attention", "mean"}
    head = load_head(Tracker(ws), "tumor", "best")
    assert head.view_id == view_id
    slide = Catalog.of(ws).slides("ok")[0]
    with pytest.raises(LookupError, match="a slide encoder's one vector per slide: there are no tiles"):
        render_heatmaps(ws, slide["slide_id"], tmp_path / "maps", heads=(head, None))
    out = runner.invoke(app, ["--workspace", str(ws.root), "predict", slide["path"], "--out", str(tmp_path / "p.csv")])
    assert out.exit_code == 2, out.output
    assert "features imported from trident:ctranspath" in " ".join(out.output.split())
    view = load_view(Catalog.of(ws), view_id)
    with pytest.raises(RuntimeError, match="--slide-weights chief=PATH"):
        _encode_slides(ws, cfg, view, head, [slide["slide_id"]], {})
    torch.save(chief_state(2), tmp_path / "other.pth")  # other weights make another view: refused by name
    with pytest.raises(RuntimeError, match=f"not those view {view_id} was made with"):
        _encode_slides(ws, cfg, view, head, [slide["slide_id"]], {"chief": tmp_path / "other.pth"})
