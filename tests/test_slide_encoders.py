"""Slide encoders: the registry, the architectures against their authors' code, strict loading, and a slide-level
view materialised from a TRIDENT import, searched by slide and used by heads.

The published layouts below are written from the authors' code (prov-gigapath/prov-gigapath
``gigapath/slide_encoder.py`` and torchscale's ``EncoderLayer`` / ``MultiheadAttention`` /
``FeedForwardNetwork`` with sub-LN; hms-dbmi/CHIEF ``models/CHIEF.py`` at size "small"), not from HistCode's
modules, so a wrong name or shape fails here. The references for the position embedding (MAE's
``get_2d_sincos_pos_embed`` over the whole grid) and for dilated attention (a loop over heads, positions and
branches) are written from the published algorithms independently of the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from histcode.features.registry import FeatureView
from histcode.ssl.encoders import EncoderError
from histcode.ssl.foundation import FOUNDATION
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
from histcode.ssl.weights import load_slide_encoder, locate_weights

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
    for name in ("titan", "prism"):
        with pytest.raises(EncoderError, match=f"slide encoder {name} .* not built: its architecture is published only as "
                                               "Hugging Face remote code"):
            build_slide_encoder(name)
    with pytest.raises(EncoderError, match="unknown slide encoder 'nope'"):
        slide_encoder_spec("nope")


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


# -- end to end ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chief_workspace(heads_cohort, tmp_path_factory):
    """The heads cohort tiled, CTransPath features of 6 patches per slide imported from TRIDENT files, and a
    CHIEF checkpoint (random weights in the published layout) on disk."""
    import h5py

    from histcode.exchange.importing import import_features
    from histcode.store.catalog import Catalog

    from tests.conftest import TINY_HEADS, _tile_cohort

    root = tmp_path_factory.mktemp("chief")
    ws = _tile_cohort(heads_cohort, root)
    (ws.root / "params.yaml").write_text(yaml.safe_dump({"labels": {"min_class_size": 2, "folds": 3}, "heads": TINY_HEADS}))
    folder = root / "trident" / "20x_256px_0px_overlap" / "features_ctranspath"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    slides = Catalog.of(ws).slides("ok")
    for s in slides:
        mag = int(round(10 / s["mpp_x"]))
        size = 256 * mag // 20
        coords = np.array([(x, y) for y in range(0, int(s["height"]) - size + 1, size)
                           for x in range(0, int(s["width"]) - size + 1, size)][:6], dtype=np.int64)
        with h5py.File(folder / f"{s['slide_id']}.h5", "w") as f:
            feats = f.create_dataset("features", data=rng.normal(size=(len(coords), 768)).astype(np.float32))
            feats.attrs.update({"name": s["slide_id"], "encoder": "ctranspath"})
            xy = f.create_dataset("coords", data=coords)
            xy.attrs.update({"patch_size": 256, "patch_size_level0": size, "level0_magnification": mag,
                             "target_magnification": 20, "overlap": 0, "name": s["slide_id"],
                             "level0_width": s["width"], "level0_height": s["height"]})
    report = import_features(ws, ws.config(), "trident", folder)
    assert not report.failed, report.as_rows()
    torch.save(chief_state(1), root / "CHIEF_pretraining.pth")
    return ws, report.view, root / "CHIEF_pretraining.pth", len(slides)


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
