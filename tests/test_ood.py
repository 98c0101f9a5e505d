"""Out-of-distribution scores: the k-NN score against brute force, leave-one-patient-out calibration, flags on
clustered data, the saved file, input errors and the cached reference of a real feature view."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from histcode.config import HistcodeConfig, OODConfig
from histcode.features import ood
from histcode.features.ood import (
    OODReference,
    build_reference,
    cache_path,
    even_quotas,
    normalize,
    reference_for_view,
)
from histcode.features.read import tile_features
from histcode.features.registry import load_view, training_state
from histcode.store.catalog import Catalog


def _reference(vectors: np.ndarray, patients: list[str], k: int, tiles_per_slide: int = 10_000) -> OODReference:
    return OODReference(normalize(vectors), np.asarray(patients), np.array([0.1, 0.2]), 0.2, k, tiles_per_slide, 0)


def _sklearn_score(reference: np.ndarray, queries: np.ndarray, k: int) -> float:
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(reference)
    distances, _ = nn.kneighbors(queries)
    return float(distances.mean(axis=1).mean())


def test_the_default_config_is_reachable() -> None:
    cfg = HistcodeConfig().predict.ood
    assert cfg.enabled and cfg.k == 10 and cfg.quantile == 0.99 and cfg.margin == 1.1


def test_score_by_hand_on_2d_vectors() -> None:
    # unit vectors at 0, 90 and 180 degrees, one patient each; lengths do not matter
    ref = _reference(np.array([[2.0, 0.0], [0.0, 1.0], [-5.0, 0.0]]), ["a", "b", "c"], k=1)
    assert ref.score(np.array([[3.0, 0.0]])) == pytest.approx(0.0, abs=1e-7)
    assert ref.score(np.array([[1.0, 1.0]])) == pytest.approx(1 - np.sqrt(0.5), abs=1e-6)  # 45 degrees
    assert ref.score(np.array([[1.0, 0.0]]), exclude_patient="a") == pytest.approx(1.0, abs=1e-6)  # then 90 degrees
    ref.k = 2
    # 0 degrees: distances 0 and 1; 45 degrees: 1 - cos 45 twice; mean over the two tiles
    expected = ((0 + 1) / 2 + (1 - np.sqrt(0.5))) / 2
    assert ref.score(np.array([[1.0, 0.0], [1.0, 1.0]])) == pytest.approx(expected, abs=1e-6)
    # without patient a: 90 (distance 1) and 180 degrees (distance 2)
    assert ref.score(np.array([[1.0, 0.0]]), exclude_patient="a") == pytest.approx(1.5, abs=1e-6)
    ref.k = 50  # more neighbours than reference tiles: all of them
    assert ref.score(np.array([[1.0, 0.0]])) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("chunk", [1024, 7])
def test_score_equals_sklearn_brute_force(monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(ood, "QUERY_CHUNK", chunk)  # query chunks that do not divide the tiles
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(300, 16)) + 0.3
    patients = [f"p{i % 5}" for i in range(300)]
    queries = rng.normal(size=(45, 16)) + 0.3
    ref = _reference(reference, patients, k=7)
    assert ref.score(queries) == pytest.approx(_sklearn_score(reference, queries, 7), abs=1e-5)
    keep = np.asarray(patients) != "p2"
    assert ref.score(queries, exclude_patient="p2") == pytest.approx(_sklearn_score(reference[keep], queries, 7), abs=1e-5)


def test_tiles_per_slide_samples_the_same_tiles_every_time() -> None:
    rng = np.random.default_rng(4)
    reference, queries = rng.normal(size=(200, 8)), rng.normal(size=(100, 8))
    ref = _reference(reference, ["a"] * 100 + ["b"] * 100, k=3, tiles_per_slide=20)
    per_tile = NearestNeighbors(n_neighbors=3, metric="cosine").fit(reference).kneighbors(queries)[0].mean(axis=1)
    score = ref.score(queries)
    assert score == ref.score(queries.copy())
    # the mean of 20 of the per-tile distances: one of the subsets, not the mean of all 100
    assert np.sort(per_tile)[:20].mean() - 1e-6 <= score <= np.sort(per_tile)[-20:].mean() + 1e-6
    assert score != pytest.approx(per_tile.mean(), abs=1e-9)


def test_even_quotas_share_the_reference_across_slides() -> None:
    assert even_quotas({"a": 3, "b": 100, "c": 100}, 50) == {"a": 3, "b": 24, "c": 23}
    assert even_quotas({"a": 3, "b": 4}, 50) == {"a": 3, "b": 4}
    assert sum(even_quotas({f"s{i}": 1000 for i in range(7)}, 100).values()) == 100


def _slides(rng: np.random.Generator, centers: np.ndarray, n_patients: int, slides_per_patient: int = 2,
            tiles: int = 60, noise: float = 0.15) -> dict[str, tuple[str, np.ndarray]]:
    out = {}
    for p in range(n_patients):
        for s in range(slides_per_patient):
            out[f"P{p}-S{s}"] = f"P{p}", _draw(rng, centers, tiles, noise)
    return out


def _draw(rng: np.random.Generator, centers: np.ndarray, tiles: int, noise: float) -> np.ndarray:
    which = rng.integers(0, len(centers), tiles)
    return (centers[which] + rng.normal(0, noise, (tiles, centers.shape[1]))).astype(np.float32)


def _centers(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    return normalize(rng.normal(size=(n, dim)))


def test_leave_one_patient_out_removes_the_patients_own_tiles() -> None:
    rng = np.random.default_rng(5)
    slides = _slides(rng, _centers(rng, 3, 24), n_patients=5)
    slides["P0-copy"] = slides["P0-S0"][0], slides["P0-S0"][1].copy()  # the same tiles on another slide of P0
    # k = 1: leaving out only the slide itself would leave the copy, at distance 0 from every tile
    cfg = OODConfig(k=1, reference_tiles=10_000, tiles_per_slide=1000, calibration_slides=100)
    ref = build_reference(slides, cfg)
    assert len(ref.vectors) == sum(len(f) for _, f in slides.values())  # all tiles fit the reference
    features = slides["P0-S0"][1]
    assert ref.score(features) == pytest.approx(0.0, abs=1e-5)  # its own tiles are in the reference
    left_out = ref.score(features, exclude_patient="P0")
    assert left_out > 0.05
    # every training slide is calibrated without any of its patient's tiles, the copy included
    expected = sorted(ref.score(f, exclude_patient=p) for p, f in slides.values())
    np.testing.assert_allclose(ref.calibration, expected, rtol=1e-6)
    assert ref.calibration.min() > 0.05 and left_out in ref.calibration
    assert ref.threshold == pytest.approx(np.quantile(expected, cfg.quantile) * cfg.margin)


def test_slides_of_the_mixture_pass_and_shifted_slides_are_flagged() -> None:
    rng = np.random.default_rng(6)
    centers = _centers(rng, 4, 32)
    slides = _slides(rng, centers, n_patients=8)
    cfg = OODConfig(k=5, reference_tiles=500, tiles_per_slide=50, calibration_slides=16)
    ref = build_reference(slides, cfg, view_id="fv-test")
    assert len(ref.vectors) <= 500 and len(ref.calibration) == 16 and ref.view_id == "fv-test"
    assert np.all(np.diff(ref.calibration) >= 0) and set(ref.patients) == {f"P{p}" for p in range(8)}

    new = ref.assess(_draw(rng, centers, 80, 0.15))
    assert new["in_distribution"] and 0.0 <= new["ood_percentile"] <= 1.0
    one_cluster = ref.assess(_draw(rng, centers[:1], 80, 0.15))  # a part of the mixture is still in it
    assert one_cluster["in_distribution"]
    elsewhere = ref.assess(_draw(rng, _centers(rng, 2, 32), 80, 0.15))  # other tissue altogether
    assert not elsewhere["in_distribution"] and elsewhere["ood_percentile"] == 1.0
    assert elsewhere["ood_score"] > ref.threshold > new["ood_score"]
    shifted = ref.assess(_draw(rng, normalize(centers + 0.8 * _centers(rng, 4, 32)), 80, 0.15))
    assert not shifted["in_distribution"]
    assert set(new) == {"ood_score", "ood_percentile", "in_distribution"}
    assert all(isinstance(a["in_distribution"], bool) for a in (new, elsewhere))


def test_the_reference_does_not_depend_on_slide_order() -> None:
    rng = np.random.default_rng(7)
    slides = _slides(rng, _centers(rng, 3, 8), n_patients=6, tiles=40)
    cfg = OODConfig(k=4, reference_tiles=100, tiles_per_slide=15, calibration_slides=5, seed=3)
    a = build_reference(slides, cfg)
    b = build_reference(dict(reversed(list(slides.items()))), cfg)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_array_equal(a.patients, b.patients)
    np.testing.assert_array_equal(a.calibration, b.calibration)
    assert len(a.vectors) == 100 and len(a.calibration) == 5
    assert np.allclose(np.linalg.norm(a.vectors, axis=1), 1.0, atol=1e-5) and a.vectors.dtype == np.float32
    counts = np.unique(a.patients, return_counts=True)[1]
    assert counts.max() - counts.min() <= 2  # 12 slides of 40 tiles share 100 reference tiles evenly
    other = build_reference(slides, cfg.model_copy(update={"seed": 4}))
    assert not np.array_equal(a.vectors, other.vectors)


def test_save_and_load_give_the_same_assessments(tmp_path) -> None:
    rng = np.random.default_rng(8)
    centers = _centers(rng, 3, 16)
    ref = build_reference(_slides(rng, centers, n_patients=4), OODConfig(k=3, reference_tiles=200, tiles_per_slide=30,
                                                                          calibration_slides=8), view_id="fv-x/y")
    path = tmp_path / "deep" / "ref.npz"
    ref.save(path)
    ref.save(path)  # replaces the file in place
    assert sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]  # no temporary file left behind
    back = OODReference.load(path)
    for name in ("vectors", "patients", "calibration"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ref, name))
    assert (back.threshold, back.k, back.tiles_per_slide, back.seed, back.view_id) == \
        (ref.threshold, ref.k, ref.tiles_per_slide, ref.seed, "fv-x/y")
    for features in (_draw(rng, centers, 50, 0.15), _draw(rng, _centers(rng, 1, 16), 50, 0.15)):
        assert back.assess(features) == ref.assess(features)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz is not a readable OOD reference"):
        OODReference.load(tmp_path / "junk.npz")


def _bad(kind: str) -> dict:
    good = np.ones((5, 4), np.float32) + np.arange(4)
    slides = {"s1": ("p1", good), "s2": ("p2", good * 2)}
    if kind == "one patient":
        slides["s2"] = ("p1", good)
    elif kind == "empty":
        slides["s2"] = ("p2", np.empty((0, 4)))
    elif kind == "dimension":
        slides["s2"] = ("p2", np.ones((5, 3)))
    elif kind == "nan":
        slides["s2"] = ("p2", np.where(np.arange(20).reshape(5, 4) == 6, np.nan, good))
    elif kind == "inf":
        slides["s2"] = ("p2", np.where(np.arange(20).reshape(5, 4) == 6, np.inf, good))
    elif kind == "1-d":
        slides["s2"] = ("p2", np.ones(4))
    return slides


@pytest.mark.parametrize("kind, message", [
    ("one patient", r"1 patient\(s\).*at least 2"),
    ("empty", r"slide 's2' has no tiles"),
    ("dimension", r"slide 's2': vectors of dim 3, expected dim 4"),
    ("nan", r"slide 's2': 1 of 5 tile vectors are not finite"),
    ("inf", r"slide 's2': 1 of 5 tile vectors are not finite"),
    ("1-d", r"slide 's2': features must be a 2-d"),
])
def test_bad_input_names_the_slide_and_the_reason(kind: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_reference(_bad(kind), OODConfig())


def test_bad_scored_features_are_refused() -> None:
    ref = build_reference(_bad("none"), OODConfig(k=2))
    with pytest.raises(ValueError, match="expected dim 4"):
        ref.score(np.ones((3, 5)))
    with pytest.raises(ValueError, match="not finite"):
        ref.assess(np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="no reference tiles are left"):
        OODReference(normalize(np.ones((2, 4))), np.array(["p", "p"]), np.array([0.1]), 0.1, 1, 10, 0).score(
            np.ones((1, 4)), exclude_patient="p")
    with pytest.raises(ValueError, match="no training slides"):
        build_reference({}, OODConfig())


def test_reference_for_view_is_built_once_and_cached(embedded_workspace, copy_workspace, monkeypatch) -> None:
    ws = copy_workspace(embedded_workspace)
    catalog = Catalog.of(ws)
    view = load_view(catalog, None, ws.config().features.attribute_columns)
    cohorts = catalog.training_cohorts()
    monkeypatch.setattr(ood, "SLIDE_CHUNK", 2)  # several reads of the view
    cfg = OODConfig(k=3, reference_tiles=60, tiles_per_slide=8, calibration_slides=4)
    ref = reference_for_view(ws, catalog, view, cohorts, cfg)
    state = training_state(catalog, view, cohorts)
    path = cache_path(ws, view, state, cfg)
    assert path.exists() and [p.name for p in (ws.outputs_dir / "ood").iterdir()] == [path.name]
    assert ref.view_id == view.view_id and ref.vectors.shape == (min(60, sum(r for _, _, r in state)), view.dim)
    assert len(ref.calibration) == min(4, len(state)) and np.isfinite(ref.threshold)

    # the same reference as built from the slides' bags in memory
    frame = tile_features(ws, view, fmt="pandas")
    slides = {sid: (g.patient_id.iloc[0], np.stack(g.sort_values(["y", "x"]).vector.to_numpy()))
              for sid, g in frame.groupby("slide_id")}
    direct = build_reference(slides, cfg, view_id=view.view_id)
    np.testing.assert_allclose(ref.vectors, direct.vectors, rtol=1e-6)
    np.testing.assert_allclose(ref.calibration, direct.calibration, rtol=1e-6)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached reference was rebuilt")

    with monkeypatch.context() as m:
        m.setattr(ood, "_reference_from_view", no_rebuild)
        again = reference_for_view(ws, catalog, view, cohorts, cfg)
        assert again.threshold == ref.threshold
        np.testing.assert_array_equal(again.vectors, ref.vectors)
        sid = min(slides)
        assert again.assess(slides[sid][1]) == ref.assess(slides[sid][1])
    other_cfg = cfg.model_copy(update={"k": 2})
    other = reference_for_view(ws, catalog, view, cohorts, other_cfg)
    # another key: the view's earlier cache file is replaced, not kept beside it
    assert other.k == 2 and [p.name for p in (ws.outputs_dir / "ood").iterdir()] == [cache_path(ws, view, state, other_cfg).name]
    with pytest.raises(ValueError, match="holds no vectors of the training cohorts"):
        reference_for_view(ws, catalog, view, ["no-such-cohort"], cfg)
