"""Every row of an ablation reads a slide's tiles the same way: the baselines (random init, colour statistics)
are embedded through the same stain normalisation as the trained encoders, and a grid of encoders that would
read tiles differently is refused before anything is embedded."""

from __future__ import annotations

import numpy as np
import pytest

from histcode.features.embed import materialize
from histcode.features.read import tile_features
from histcode.features.registry import describe_view
from histcode.ssl.dataset import dataset_from_catalog
from histcode.ssl.pretrain import register_baseline_encoder
from histcode.ssl.stain_norm import describe, normalise_dataset
from histcode.store.catalog import Catalog
from histcode.tiling.spec import spec_id_of
from histcode.tracking import Tracker


def _tags(ws, version: str) -> dict:
    return dict(Tracker(ws).client.get_model_version("histcode-encoder", version).tags)


def test_the_colour_baseline_embeds_the_stain_normalised_tiles(embedded_workspace, copy_workspace) -> None:
    ws = copy_workspace(embedded_workspace)
    cfg = ws.config()
    assert cfg.pretrain.stain_norm.method == "macenko"
    version = register_baseline_encoder(ws, cfg, "colour")
    view = materialize(ws, cfg, encoder=f"histcode-encoder/{version}", progress=False).view
    assert view.dim == 6
    catalog = Catalog.of(ws)
    sid = catalog.slides(status="ok")[0]["slide_id"]
    stored = tile_features(ws, view, slide_ids=[sid], fmt="pandas").set_index("tile_id")

    def reference(normalised: bool) -> np.ndarray:
        """Per-channel mean and sd (n - 1) of each tile as the training dataset reads it, computed here."""
        data = dataset_from_catalog(catalog, spec_id_of(cfg.tiling), view.image_px, slide_ids=[sid])
        if normalised:
            normalise_dataset(data, cfg.pretrain.stain_norm)
        rows = []
        for i in range(len(data)):
            px = data[i].numpy().reshape(3, -1).astype(np.float64) / 255.0
            rows.append(np.concatenate([px.mean(axis=1), px.std(axis=1, ddof=1)]))
        ids = list(data.tile_ids)
        data.close()
        return np.stack(rows)[np.argsort(ids)]

    got = np.stack(stored.sort_index().vector)
    np.testing.assert_allclose(got, reference(normalised=True), atol=2e-4)
    assert np.abs(got - reference(normalised=False)).max() > 0.01  # the normalisation did change the tiles


def test_baselines_carry_the_trained_encoders_reading_and_are_registered_again_when_it_changes(
        embedded_workspace, copy_workspace) -> None:
    from histcode.apps.ablation import _baseline_version

    ws = copy_workspace(embedded_workspace)
    cfg = ws.config()
    trained = _tags(ws, "1")  # the fixture's one pretrained encoder
    assert trained["stain_norm"] == describe(cfg.pretrain.stain_norm) != "none"
    for method in ("random", "colour"):
        version = _baseline_version(ws, cfg, method)
        assert _tags(ws, version)["stain_norm"] == trained["stain_norm"]
        assert _baseline_version(ws, cfg, method) == version  # the same settings reuse it
    raw = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(
        update={"stain_norm": cfg.pretrain.stain_norm.model_copy(update={"method": "none"})})})
    old = _baseline_version(ws, cfg, "random")
    new = _baseline_version(ws, raw, "random")
    assert new != old and _tags(ws, new)["stain_norm"] == "none"
    spec = spec_id_of(cfg.tiling)
    tracker = Tracker(ws)
    assert describe_view(tracker, f"histcode-encoder/{new}", spec, ()).view_id != \
        describe_view(tracker, f"histcode-encoder/{old}", spec, ()).view_id


def test_a_grid_of_encoders_reading_tiles_differently_is_refused_before_any_work(embedded_workspace,
                                                                                 copy_workspace) -> None:
    from histcode.apps.ablation import AblationError, check_same_reading, run_ablation

    check_same_reading({"random": "x", "adco": "x"})
    with pytest.raises(AblationError, match="random: none; adco: "):
        check_same_reading({"random": "none", "adco": describe(embedded_workspace.config().pretrain.stain_norm)})
    ws = copy_workspace(embedded_workspace)
    cfg = ws.config()
    client = Tracker(ws).client
    client.set_registered_model_alias("histcode-encoder", "other", "1")
    client.delete_model_version_tag("histcode-encoder", "1", "stain_norm")  # as a foundation encoder registers
    before = Catalog.of(ws).query("SELECT count(*) AS n FROM feature_views")[0]["n"]
    with pytest.raises(AblationError, match="read tiles differently"):
        run_ablation(ws, cfg, ("random", "other"), ("mean",), ("tumor",))
    assert Catalog.of(ws).query("SELECT count(*) AS n FROM feature_views")[0]["n"] == before  # nothing embedded
