"""Foundation encoders: every registry entry builds and takes its published weights; one small encoder, saved with
random weights in its published format, is registered from a Hugging Face cache folder, embeds real slides and
trains heads; every registered encoder loads back as a trainable module.

The published layouts below are written from the model cards and the authors' loaders (timm configs; the
transformers Dinov2Model names; the original Swin layout with downsampling at the end of a stage), not from
HistCode's registry, so a wrong entry fails here.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from histcode.ssl.encoders import EncoderError
from histcode.ssl.foundation import FOUNDATION, build_foundation, foundation_spec
from histcode.ssl.weights import hf_dinov2_to_timm, load_published, locate_weights, read_state_dict

from tests.conftest import TINY_HEADS, _tile_cohort

runner = CliRunner()

timm = pytest.importorskip("timm")
SwiGLU = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}

# name -> (timm model, arguments) as each model card gives them
CARDS = {
    "uni": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)),
    "uni2-h": ("vit_giant_patch14_224", dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                                             embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                                             reg_tokens=8, dynamic_img_size=True, **SwiGLU)),
    "virchow2": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
                                              global_pool="", dynamic_img_size=True, **SwiGLU)),
    "virchow": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                                             global_pool="", dynamic_img_size=True, **SwiGLU)),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5, num_classes=0, dynamic_img_size=False)),
    "prov-gigapath": ("vit_giant_patch14_dinov2", dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40,
                                                       num_heads=24, init_values=1e-5, mlp_ratio=5.33334, num_classes=0)),
    "kaiko-vit-s16": ("vit_small_patch16_224", dict(num_classes=0, img_size=224)),
}

# a few tensors of each published checkpoint, with their shapes (parameter counts in millions as published)
ANCHORS = {
    "uni": ({"pos_embed": (1, 197, 1024), "blocks.23.ls2.gamma": (1024,), "patch_embed.proj.weight": (1024, 3, 16, 16)}, 303),
    "uni2-h": ({"reg_token": (1, 8, 1536), "pos_embed": (1, 256, 1536), "blocks.23.mlp.fc1.weight": (8192, 1536),
                "blocks.23.mlp.fc2.weight": (1536, 4096)}, 681),
    "virchow2": ({"reg_token": (1, 4, 1280), "pos_embed": (1, 261, 1280), "blocks.31.mlp.fc1.weight": (6832, 1280), "blocks.31.mlp.fc2.weight": (1280, 3416)}, 631),
    "virchow": ({"pos_embed": (1, 257, 1280), "blocks.31.mlp.fc1.weight": (6832, 1280), "blocks.31.mlp.fc2.weight": (1280, 3416)}, 631),
    "h-optimus-0": ({"reg_token": (1, 4, 1536), "pos_embed": (1, 256, 1536), "blocks.39.mlp.fc1.weight": (8192, 1536)}, 1135),
    "prov-gigapath": ({"pos_embed": (1, 197, 1536), "patch_embed.proj.weight": (1536, 3, 16, 16), "blocks.39.ls1.gamma": (1536,)}, 1135),
    "kaiko-vit-s16": ({"pos_embed": (1, 197, 384), "blocks.11.mlp.fc1.weight": (1536, 384)}, 22),
    "phikon-v2": ({"embeddings.position_embeddings": (1, 197, 1024), "encoder.layer.23.attention.attention.query.weight": (1024, 1024),
                   "encoder.layer.23.layer_scale2.lambda1": (1024,), "layernorm.weight": (1024,)}, 303),
    "ctranspath": ({"patch_embed.proj.0.weight": (12, 3, 3, 3), "patch_embed.proj.6.weight": (96, 24, 1, 1),
                    "layers.0.downsample.reduction.weight": (192, 384), "layers.2.downsample.norm.weight": (1536,),
                    "layers.3.blocks.1.attn.relative_position_bias_table": (169, 24), "norm.weight": (768,)}, 28),
    "conch-v1.5": ({"trunk.pos_embed": (1, 197, 1024), "attn_pool_contrast.query": (1, 768),
                    "attn_pool_contrast.to_kv.weight": (1536, 1024), "ln_contrast.weight": (768,)}, 307),
}


def _meta_state(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.empty(v.shape, device="meta", dtype=v.dtype) for k, v in model.state_dict().items()}


def _hf_dinov2_large() -> dict[str, torch.Tensor]:
    """transformers' Dinov2Model names for ViT-L/16 at 224 (phikon-v2's config.json)."""
    d = 1024
    shapes = {"embeddings.cls_token": (1, 1, 1024), "embeddings.mask_token": (1, 1024),
                       "embeddings.position_embeddings": (1, 197, 1024),
                       "embeddings.patch_embeddings.projection.weight": (1024, 3, 16, 16),
                       "embeddings.patch_embeddings.projection.bias": (1024,), "layernorm.weight": (d,), "layernorm.bias": (d,)}
    for i in range(24):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            shapes[p + f"attention.attention.{part}.weight"], shapes[p + f"attention.attention.{part}.bias"] = (d, d), (d,)
        shapes.update({p + "attention.output.dense.weight": (d, d), p + "attention.output.dense.bias": (d,),
                       p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "norm2.weight": (d,), p + "norm2.bias": (d,),
                       p + "layer_scale1.lambda1": (d,), p + "layer_scale2.lambda1": (d,),
                       p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,), p + "mlp.fc2.weight": (d, 4 * d),
                       p + "mlp.fc2.bias": (d,)})
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _ctranspath_original() -> dict[str, torch.Tensor]:
    """The original Swin-T layout (Liu et al.'s code, which TransPath used): patch merging at the end of stages 0-2,
    relative position indices and attention masks stored, the convolutional stem's Sequential."""
    with torch.device("meta"):
        swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0)
    state = {}
    for key, value in _meta_state(swin).items():
        if key.startswith("patch_embed."):
            continue
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", key)
        state[key] = value
    stem = {"0.weight": (12, 3, 3, 3), "3.weight": (24, 12, 3, 3), "6.weight": (96, 24, 1, 1), "6.bias": (96,)}
    for i, c in ((1, 12), (4, 24)):
        stem.update({f"{i}.weight": (c,), f"{i}.bias": (c,), f"{i}.running_mean": (c,), f"{i}.running_var": (c,)})
    state.update({f"patch_embed.proj.{k}": torch.empty(s, device="meta") for k, s in stem.items()})
    state.update({f"patch_embed.proj.{i}.num_batches_tracked": torch.empty((), dtype=torch.long, device="meta") for i in (1, 4)})
    state.update({"patch_embed.norm.weight": torch.empty(96, device="meta"), "patch_embed.norm.bias": torch.empty(96, device="meta")})
    for stage, depth in enumerate((2, 2, 6, 2)):
        for block in range(depth):
            state[f"layers.{stage}.blocks.{block}.attn.relative_position_index"] = torch.empty((49, 49), dtype=torch.long, device="meta")
            if block % 2 and stage < 3:
                state[f"layers.{stage}.blocks.{block}.attn_mask"] = torch.empty((1, 49, 49), device="meta")
    return state


def _conch_vision() -> dict[str, torch.Tensor]:
    """CONCH v1.5's pytorch_model_vision.bin: a ViT-L/16 trunk (LayerScale 1.0) published at 224, the pooler, the
    LayerNorm."""
    with torch.device("meta"):
        trunk = timm.create_model("vit_large_patch16_224", num_classes=0, init_values=1.0)
    state = _meta_state(trunk, "trunk.")
    shapes = {"attn_pool_contrast.query": (1, 768), "attn_pool_contrast.ln_k.weight": (1024,),
              "attn_pool_contrast.ln_k.bias": (1024,), "attn_pool_contrast.ln_q.weight": (768,),
              "attn_pool_contrast.ln_q.bias": (768,), "attn_pool_contrast.to_q.weight": (768, 768),
              "attn_pool_contrast.to_kv.weight": (1536, 1024), "attn_pool_contrast.to_out.weight": (768, 768),
              "ln_contrast.weight": (768,), "ln_contrast.bias": (768,)}
    state.update({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    return state


def published_state(name: str) -> dict[str, torch.Tensor]:
    if name in CARDS:
        model_name, args = CARDS[name]
        with torch.device("meta"):
            return _meta_state(timm.create_model(model_name, pretrained=False, **args))
    return {"phikon-v2": _hf_dinov2_large, "ctranspath": _ctranspath_original, "conch-v1.5": _conch_vision}[name]()


def test_the_registry_has_the_issue_s_encoders() -> None:
    assert {"uni", "uni2-h", "conch-v1.5", "virchow2", "phikon-v2", "h-optimus-0", "prov-gigapath", "ctranspath",
            "kaiko-vit-s16"} <= set(FOUNDATION)
    for spec in FOUNDATION.values():
        assert spec.licence and spec.card.startswith("https://") and spec.weight_files and spec.dim > 0


@pytest.mark.parametrize("name", sorted(FOUNDATION))
def test_entry_builds_on_meta_and_takes_its_published_state_dict(name: str) -> None:
    spec = foundation_spec(name)
    published = published_state(name)
    anchors, params_m = ANCHORS[name]
    for key, shape in anchors.items():
        assert tuple(published[key].shape) == shape, key
    counted = sum(v.numel() for k, v in published.items() if v.is_floating_point() and "running_" not in k
                  and "attn_mask" not in k and k != "embeddings.mask_token")
    assert counted / 1e6 == pytest.approx(params_m, rel=0.03)
    with torch.device("meta"):
        encoder = build_foundation(name)
        load_published(spec, encoder, published, f"published {name}")
        out = encoder(torch.empty(2, 3, spec.input_px, spec.input_px))
    assert tuple(out.shape) == (2, spec.dim)


def test_a_state_dict_of_another_encoder_is_refused_by_name() -> None:
    with torch.device("meta"):
        encoder = build_foundation("uni")
    with pytest.raises(EncoderError, match=r"kaiko file does not fit UNI .*192 missing \(blocks\.0\.ls1\.gamma.* of another shape \(cls_token \(1, 1, 384\)"):
        load_published(foundation_spec("uni"), encoder, published_state("kaiko-vit-s16"), "kaiko file")


def test_hf_dinov2_keys_become_timm_with_query_key_value_stacked() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 4, generator=g) for _ in range(3))
    state = {"encoder.layer.0.attention.attention.query.weight": q, "encoder.layer.0.attention.attention.key.weight": k,
             "encoder.layer.0.attention.attention.value.weight": v, "embeddings.mask_token": torch.zeros(1, 4),
             "encoder.layer.0.layer_scale1.lambda1": torch.ones(4), "layernorm.bias": torch.zeros(4)}
    out = hf_dinov2_to_timm(state)
    assert set(out) == {"blocks.0.attn.qkv.weight", "blocks.0.ls1.gamma", "norm.bias"}
    assert torch.equal(out["blocks.0.attn.qkv.weight"], torch.cat([q, k, v]))


def _hf_cache(root, spec, state: dict[str, torch.Tensor]):
    """The folder layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/<file>}."""
    from safetensors.torch import save_file

    entry = root / ("models--" + spec.hf_repo.replace("/", "--"))
    snapshot = entry / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / spec.weight_files[0]))
    return snapshot / spec.weight_files[0]


def test_weights_are_found_in_a_hugging_face_cache_and_a_missing_file_says_what_to_place_where(tmp_path) -> None:
    spec = foundation_spec("kaiko-vit-s16")
    model_name, args = CARDS["kaiko-vit-s16"]
    file = _hf_cache(tmp_path / "hub", spec, timm.create_model(model_name, **args).state_dict())
    assert locate_weights(spec, tmp_path / "hub") == file  # the cache root
    assert locate_weights(spec, file.parents[2]) == file  # the model's entry
    assert locate_weights(spec, file) == file
    assert set(read_state_dict(file)) >= {"cls_token", "pos_embed"}
    with pytest.raises(EncoderError) as missing:
        locate_weights(foundation_spec("uni"), tmp_path / "hub")
    message = str(missing.value)
    assert "pytorch_model.bin" in message and str(tmp_path / "hub") in message and "MahmoodLab/UNI" in message
    assert "Nothing is downloaded" in message
    (tmp_path / "broken.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="broken.bin: not a readable weight file"):
        read_state_dict(tmp_path / "broken.bin")


def _flat(output: str) -> str:
    """CLI output with the terminal's line wrapping undone."""
    return " ".join(output.split())


@pytest.fixture(scope="module")
def foundation_workspace(heads_cohort, tmp_path_factory):
    """The heads cohort tiled, with Kaiko ViT-S/16 (random weights saved as its published safetensors in a Hugging
    Face cache) registered through the CLI and its feature view materialised."""
    from histcode.cli import app

    root = tmp_path_factory.mktemp("foundation")
    ws = _tile_cohort(heads_cohort, root)
    spec = foundation_spec("kaiko-vit-s16")
    model_name, args = CARDS["kaiko-vit-s16"]
    torch.manual_seed(0)
    _hf_cache(root / "hf", spec, timm.create_model(model_name, **args).state_dict())
    params = {"labels": {"min_class_size": 2, "folds": 3}, "heads": TINY_HEADS,
              "features": {"encoder": "histcode-encoder@kaiko-vit-s16"}}
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
    result = runner.invoke(app, ["--workspace", str(ws.root), "encoders", "register", "kaiko-vit-s16", "--weights",
                                 str(root / "hf")])
    assert result.exit_code == 0, result.output
    assert "registered as histcode-encoder version 1, alias kaiko-vit-s16" in _flat(result.output)
    result = runner.invoke(app, ["--workspace", str(ws.root), "embed"])
    assert result.exit_code == 0, result.output
    return ws


def test_a_foundation_encoder_becomes_a_view_that_search_and_heads_use(foundation_workspace, heads_cohort) -> None:
    from histcode.apps.train_heads import train_heads
    from histcode.cli import app
    from histcode.features.registry import default_view
    from histcode.labels.run import gate_labels, ingest_labels
    from histcode.store.catalog import Catalog
    from histcode.tracking import Tracker

    ws = foundation_workspace
    view = default_view(Catalog.of(ws), Tracker(ws), ws.config())
    assert (view.dim, view.image_px, view.mpp, view.method) == (384, 224, 0.5, "foundation:kaiko-vit-s16")
    n_tiles = Catalog.of(ws).query("SELECT count(*) AS n FROM tiles")[0]["n"]
    sql = runner.invoke(app, ["--workspace", str(ws.root), "sql", "SELECT count(*) AS n FROM tile_embeddings", "--format", "json"])
    assert sql.exit_code == 0, sql.output
    assert json.loads(sql.output.strip().splitlines()[-1])["n"] == n_tiles
    slide = Catalog.of(ws).query("SELECT slide_id FROM slides ORDER BY slide_id LIMIT 1")[0]["slide_id"]
    hits = runner.invoke(app, ["--workspace", str(ws.root), "search", "--slide", slide, "--k", "3", "--format", "json"])
    assert hits.exit_code == 0, hits.output
    assert len([line for line in hits.output.strip().splitlines() if line.startswith("{")]) == 3

    ingest_labels(ws, ws.config(), heads_cohort.out_dir / "expression.tsv")
    assert gate_labels(ws, ws.config()).passed
    report = train_heads(ws, ws.config())
    assert report.view.view_id == view.view_id
    assert {r.task.name for r in report.results} == {"tumor", "subtype", "de", "survival"}
    assert {"tumor/attention", "subtype/guided", "de/mean"} <= set(report.versions)

    from histcode.apps.ablation import AblationError, run_ablation

    (grid,) = run_ablation(ws, ws.config(), methods=("kaiko-vit-s16",), aggregators=("mean",), tasks=("tumor",))
    assert grid.view.view_id == view.view_id and grid.aliases == "ablation-kaiko-vit-s16"
    with pytest.raises(AblationError, match="'uni' is neither one of random, colour, simclr, moco, adco nor an alias"):
        run_ablation(ws, ws.config(), methods=("uni",), aggregators=("mean",), tasks=("tumor",))


def test_the_view_reads_tiles_at_the_encoder_s_microns_per_pixel(foundation_workspace) -> None:
    from histcode.features.embed import plan_view
    from histcode.ssl.dataset import dataset_from_catalog
    from histcode.store.catalog import Catalog
    from histcode.tiling.spec import spec_id_of

    ws = foundation_workspace
    cfg = ws.config()
    plan = plan_view(ws, cfg)
    field = plan.view.tile_field(cfg.tiling.tile_px, cfg.tiling.target_mpp)
    assert field == pytest.approx(224 * 0.5 / (256 * 0.5))
    slide = sorted(plan.slides)[0]
    read = plan.dataset([slide])
    whole = dataset_from_catalog(Catalog.of(ws), spec_id_of(cfg.tiling), 256, slide_ids=[slide])
    assert read.tile_ids == whole.tile_ids
    for i in (0, len(read) // 2):
        centre = whole[i].numpy()[:, 16:240, 16:240].astype(float)  # the middle 224 of 256 px, both at 0.5 um/px
        assert np.abs(read[i].numpy().astype(float) - centre).mean() < 3.0


def test_registered_encoders_load_back_as_trainable_modules(foundation_workspace, embedded_workspace, tmp_path) -> None:
    from histcode.cli import app
    from histcode.features.registry import load_encoder
    from histcode.tracking import Tracker

    ws = foundation_workspace
    encoder = load_encoder(ws.root, "histcode-encoder@kaiko-vit-s16")
    assert isinstance(encoder, torch.nn.Module) and not encoder.training
    x = torch.rand(3, 3, 224, 224)
    exported = Tracker(ws).load_model("models:/histcode-encoder@kaiko-vit-s16")
    with torch.inference_mode():
        assert torch.allclose(encoder(x), exported(x), atol=1e-4)
    encoder.train()  # fine-tuning: gradients reach the published weights
    encoder(x).sum().backward()
    assert encoder.backbone.patch_embed.proj.weight.grad is not None

    ours = load_encoder(embedded_workspace, "histcode-encoder")
    assert ours.name == embedded_workspace.config().pretrain.encoder
    ours.eval().train()

    again = runner.invoke(app, ["--workspace", str(ws.root), "encoders", "register", "kaiko-vit-s16", "--weights",
                                str(ws.root.parent / "hf")])
    assert again.exit_code == 0 and "already registered as histcode-encoder version 1" in _flat(again.output)
    listing = runner.invoke(app, ["--workspace", str(ws.root), "encoders", "list", "--format", "json"])
    assert listing.exit_code == 0, listing.output
    data = json.loads(listing.output)
    assert [e["name"] for e in data["foundation"]] == list(FOUNDATION)
    assert [(r["version"], r["aliases"], r["encoder"]) for r in data["registered"]] == [("1", "kaiko-vit-s16", "foundation:kaiko-vit-s16")]
    missing = runner.invoke(app, ["--workspace", str(ws.root), "encoders", "register", "uni", "--weights", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "UNI weights not found" in _flat(missing.output)


def test_a_registered_foundation_encoder_stores_its_weights_once(foundation_workspace) -> None:
    """The module's state dict is the one copy of the weights: the exported program is logged without them and
    takes them from it on load. Module and program embed as the published weights do."""
    from histcode.features.registry import load_encoder
    from histcode.tracking import Tracker

    ws = foundation_workspace
    tracker = Tracker(ws)
    spec = foundation_spec("kaiko-vit-s16")
    published = build_foundation(spec.name, weightless=True)
    load_published(spec, published, read_state_dict(locate_weights(spec, ws.root.parent / "hf")), "published")
    published.eval()
    weights = sum(t.numel() * t.element_size() for t in published.state_dict().values())
    version = tracker.client.get_model_version_by_alias("histcode-encoder", "kaiko-vit-s16")
    stored = tracker.stored_bytes("histcode-encoder", version.version)
    assert sum(stored.values()) < 1.3 * weights  # 2.2 x when the program held a second copy
    program_files = tracker.client.list_logged_model_artifacts(version.source.removeprefix("models:/"), "data")
    assert sum(f.file_size for f in program_files) < 0.05 * weights

    x = torch.rand(3, 3, 224, 224)
    module = load_encoder(ws, "histcode-encoder@kaiko-vit-s16")
    program = tracker.load_model("models:/histcode-encoder@kaiko-vit-s16")
    with torch.inference_mode():
        want = published(x)
        assert torch.allclose(module(x), want, atol=1e-5) and torch.allclose(program(x), want, atol=1e-5)


def test_virchow_pooling_is_the_class_token_beside_the_mean_of_the_patch_tokens() -> None:
    from histcode.ssl.foundation import ClassAndPatchMean

    tokens = torch.randn(2, 1 + 4 + 9, 6)  # class, 4 registers, 9 patches
    out = ClassAndPatchMean(5)(tokens)
    assert torch.allclose(out[:, :6], tokens[:, 0]) and torch.allclose(out[:, 6:], tokens[:, 5:].mean(1))


def test_conch_pooler_is_coca_s_attentional_pooling() -> None:
    """Yu et al. 2022 (CoCa): o = W_o concat_h softmax(q_h k_h^T / sqrt(d_h)) v_h with q = W_q LN(query) and
    [k, v] = W_kv LN(x), written per head with explicit loops."""
    from histcode.ssl.foundation import AttentionalPooler

    torch.manual_seed(0)
    pool = AttentionalPooler(d_model=8, context_dim=6, n_head=2, n_queries=1).eval()
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        got = pool(x)
        q = pool.to_q(torch.nn.functional.layer_norm(pool.query, (8,), pool.ln_q.weight, pool.ln_q.bias))
        kv = pool.to_kv(torch.nn.functional.layer_norm(x, (6,), pool.ln_k.weight, pool.ln_k.bias))
        k, v = kv[..., :8], kv[..., 8:]
        for b in range(3):
            heads = []
            for h in range(2):
                sl = slice(4 * h, 4 * h + 4)
                weights = torch.softmax(q[:, sl] @ k[b, :, sl].T / 2.0, dim=-1)
                heads.append(weights @ v[b, :, sl])
            assert torch.allclose(got[b], pool.to_out(torch.cat(heads, dim=-1)), atol=1e-5)


def test_an_old_format_checkpoint_is_read(tmp_path) -> None:
    state = {"w": torch.arange(4.0)}
    torch.save({"model": state}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(tmp_path / "old.pth")["w"], state["w"])


def test_a_field_wider_than_the_tile_reads_around_it_edges_included(tiled_workspace) -> None:
    """CONCH v1.5 (2x) and CTransPath (1.75x) see more than a 0.5 um/px tile: the square around it, white beyond
    the slide, the tile itself in the middle."""
    from histcode.ssl.dataset import dataset_from_catalog
    from histcode.store.catalog import Catalog
    from histcode.tiling.spec import spec_id_of

    ws = tiled_workspace
    cfg = ws.config()
    catalog = Catalog.of(ws)
    slide = sorted(s["slide_id"] for s in catalog.slides(status="ok"))[0]
    whole = dataset_from_catalog(catalog, spec_id_of(cfg.tiling), 128, slide_ids=[slide])
    wide = dataset_from_catalog(catalog, spec_id_of(cfg.tiling), 256, slide_ids=[slide], field=2.0)
    edge = int(np.argmin(whole.tiles[:, 1] + whole.tiles[:, 2]))  # the tile nearest the slide's corner
    for i in (edge, len(whole) // 2):
        centre = wide[i].numpy()[:, 64:192, 64:192].astype(float)
        assert np.abs(centre - whole[i].numpy().astype(float)).mean() < 3.0


def test_a_version_registered_without_its_module_says_so(foundation_workspace) -> None:
    from histcode.features.registry import ViewError, load_encoder
    from histcode.tracking import Tracker

    ws = foundation_workspace
    tracker = Tracker(ws)
    with tracker.run("encoders", "legacy") as run_id:
        tracker.log_torch_model(run_id, torch.nn.Linear(3, 2).eval(), "encoder", (3,), 2, "legacy-encoder",
                                aliases=("old",), version_tags={"dim": 2, "image_px": 1, "run_id": run_id})
    with pytest.raises(ViewError, match="legacy-encoder version 1 .* has no encoder_module artifact: it was registered before"):
        load_encoder(ws, "legacy-encoder@old")


def test_the_random_baseline_loads_back_as_a_module(embedded_workspace, copy_workspace) -> None:
    from histcode.features.registry import load_encoder
    from histcode.ssl.pretrain import register_baseline_encoder

    ws = copy_workspace(embedded_workspace)
    register_baseline_encoder(ws, ws.config(), "random")
    encoder = load_encoder(ws, "histcode-encoder@random")
    assert encoder.name == ws.config().pretrain.encoder and not encoder.training


def test_a_registration_that_fails_half_way_leaves_no_run_no_version_and_no_weights(foundation_workspace,
                                                                                    monkeypatch) -> None:
    from mlflow import MlflowClient

    from histcode.apps.encoders import register_foundation
    from histcode.tracking import Tracker

    ws = foundation_workspace
    tracker = Tracker(ws)
    experiment = tracker.experiment_id("encoders")
    runs = {r.info.run_id for r in tracker.client.search_runs([experiment])}
    versions = {v.version for v in tracker.client.search_model_versions("name = 'histcode-encoder'")}
    folders = {p.relative_to(tracker.artifact_root) for p in (tracker.artifact_root / "encoders").rglob("*") if p.is_dir()}

    def broken(self, *args, **kwargs):
        raise RuntimeError("alias failed")  # after the export is logged and the version registered

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", broken)
    with pytest.raises(RuntimeError, match="alias failed"):
        register_foundation(ws, ws.config(), "kaiko-vit-s16", ws.root.parent / "hf", force=True)
    monkeypatch.undo()
    assert {r.info.run_id for r in tracker.client.search_runs([experiment])} == runs
    assert {v.version for v in tracker.client.search_model_versions("name = 'histcode-encoder'")} == versions
    after = {p.relative_to(tracker.artifact_root) for p in (tracker.artifact_root / "encoders").rglob("*") if p.is_dir()}
    assert after == folders  # neither the module nor the exported program's copy of the weights is left


def test_half_precision_weights_load_as_float32() -> None:
    spec = foundation_spec("kaiko-vit-s16")
    model_name, args = CARDS["kaiko-vit-s16"]
    state = {k: v.half() for k, v in timm.create_model(model_name, **args).state_dict().items()}
    encoder = build_foundation("kaiko-vit-s16", weightless=True)
    load_published(spec, encoder, state, "a half-precision file")
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
    with torch.inference_mode():
        assert torch.isfinite(encoder.eval()(torch.rand(1, 3, 224, 224))).all()
