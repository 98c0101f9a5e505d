"""Slide retrieval: the field's figures against hand-computed cases, centring on vectors with a shared offset,
centred slide search against a numpy reference, and `histcode search --evaluate` on a real embedded workspace."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from mlflow import MlflowClient

from histcode.features.read import slide_features
from histcode.features.registry import load_view
from histcode.features.retrieval import (
    average_precision_at_k,
    cutoffs_for,
    evaluate,
    evaluate_view,
    log_retrieval,
    majority_label,
    slide_labels,
    tissue_label,
)
from histcode.features.search import SearchError, nearest, nearest_slides, search
from histcode.store.catalog import Catalog
from histcode.store.vectors import (
    SLIDE_KIND,
    TableSpec,
    connect,
    open_table,
    to_batch,
    upsert_slides,
)
from histcode.tracking import Tracker
from tests.conftest import runs_left_running
from tests.test_cli import invoke


# -- the definitions, by hand ---------------------------------------------------------------------------------
def test_majority_vote_by_hand() -> None:
    assert majority_label(["b", "a", "b"]) == "b"
    assert majority_label(["a", "b"]) == "a"  # a tie goes to the nearest
    assert majority_label(["b", "a", "a", "b", "c"]) == "b"  # 2-2-1: b is met first
    assert majority_label(["c", "a", "b"]) == "c"
    assert majority_label([]) is None


def test_average_precision_at_k_by_hand() -> None:
    # AP@5 = (1/5) * sum of precision@i over relevant ranks i
    assert average_precision_at_k([True] * 5, 5) == pytest.approx(1.0)
    assert average_precision_at_k([True, False, True, False, False], 5) == pytest.approx((1 / 1 + 2 / 3) / 5)
    assert average_precision_at_k([False, False, False, False, True], 5) == pytest.approx((1 / 5) / 5)
    assert average_precision_at_k([False] * 5, 5) == 0.0
    assert average_precision_at_k([True, True], 5) == pytest.approx(2 / 5)  # fewer than k retrieved
    assert average_precision_at_k([True, False, True, True, True, True], 3) == pytest.approx((1 + 2 / 3) / 3)


def test_labels_and_cutoffs() -> None:
    assert tissue_label("normal", "LUAD") == "normal" and tissue_label("Solid Tissue Normal", None) == "normal"
    assert tissue_label("tumor", "LUSC") == "LUSC" and tissue_label("tumor", "") is None and tissue_label(None, None) is None
    assert cutoffs_for(5) == (1, 3, 5) and cutoffs_for(3) == (1, 3) and cutoffs_for(10) == (1, 3, 5, 10)
    with pytest.raises(ValueError, match="at least 1"):
        cutoffs_for(0)


# Seven slides on a circle (cosine distance is monotone in the angle between them; the norms differ so that
# only the direction counts). s4 is s0's patient's other slide and lies nearest to it; s6 has no label.
ANGLES = [0, 10, 25, 42, 5, 60, 7]
LABELS = ["A", "A", "B", "B", "B", "C", None]
PATIENTS = ["p0", "p1", "p2", "p3", "p0", "p4", "p5"]
IDS = [f"s{i}" for i in range(7)]


def _circle() -> np.ndarray:
    rad = np.deg2rad(ANGLES)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1) * np.arange(1, 8)[:, None]


def test_evaluation_by_hand() -> None:
    """Neighbours by angle, worked out on paper (see the comments), against evaluate()."""
    report = evaluate(_circle(), LABELS, PATIENTS, IDS, k=5, centring="none")
    q = report.queries.set_index("slide_id")
    # s0 (A): s4 is its own patient's, s6 unlabelled -> s1 A, s2 B, s3 B, s5 C
    assert q.loc["s0", "neighbours"] == ["s1", "s2", "s3", "s5"]
    assert q.loc["s4", "neighbours"] == ["s1", "s2", "s3", "s5"]  # s4 (B, p0) never sees s0
    assert q.loc["s1", "neighbours"] == ["s4", "s0", "s2", "s3", "s5"]
    assert q.loc["s2", "neighbours"] == ["s1", "s3", "s4", "s0", "s5"]
    assert q.loc["s3", "neighbours"] == ["s2", "s5", "s1", "s4", "s0"]
    assert q.loc["s5", "neighbours"] == ["s3", "s2", "s1", "s4", "s0"]
    assert "s6" not in q.index and all("s6" not in n for n in q.neighbours)
    # hits:    s0 s1 s2 s3 s4 s5
    # MV@1:     1  0  0  1  0  0
    # MV@3:     0  0  1  1  1  0   (s3: B, C, A all tie, B nearest)
    # MV@5:     0  0  0  1  1  0   (s2: A A B B C -> tie A/B, A nearest; s3: B C A B A -> tie, B nearest)
    # AP@5: s0 1/5, s1 (1/2)/5, s2 (1/2 + 2/3)/5, s3 (1 + 2/4)/5, s4 (1/2 + 2/3)/5, s5 0
    assert q.mv_at_1.tolist() == [1, 0, 0, 1, 0, 0] and q.mv_at_3.tolist() == [0, 0, 1, 1, 1, 0]
    assert q.mv_at_5.tolist() == [0, 0, 0, 1, 1, 0]
    ap = [1 / 5, (1 / 2) / 5, (1 / 2 + 2 / 3) / 5, (1 + 2 / 4) / 5, (1 / 2 + 2 / 3) / 5, 0.0]
    np.testing.assert_allclose(q.ap_at_5, ap)
    m = report.metrics()
    assert m["mv_at_1"] == pytest.approx(2 / 6) and m["mv_at_3"] == pytest.approx(3 / 6) and m["mv_at_5"] == pytest.approx(2 / 6)
    # classes A = {s0, s1}, B = {s2, s3, s4}, C = {s5}
    assert m["mmv_at_1"] == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)
    assert m["mmv_at_3"] == pytest.approx((0 + 1 + 0) / 3)
    assert m["mmv_at_5"] == pytest.approx((0 + 2 / 3 + 0) / 3)
    assert m["map_at_5"] == pytest.approx(sum(ap) / 6)
    assert m["mmap_at_5"] == pytest.approx((sum(ap[:2]) / 2 + sum(ap[2:5]) / 3 + 0) / 3)
    assert m["B/mv_at_3"] == 1.0 and m["C/slides"] == 1 and m["slides"] == 6 and m["patients"] == 5
    rows = {r["class"]: r for r in report.table().to_pylist()}
    assert set(rows) == {"A", "B", "C", "all", "macro"}
    assert rows["all"]["MV@5"] == pytest.approx(2 / 6) and rows["macro"]["MV@5"] == pytest.approx(2 / 9)
    assert rows["B"]["slides"] == 3 and rows["B"]["patients"] == 3 and rows["all"]["mAP@5"] == pytest.approx(sum(ap) / 6)
    assert report.short_queries == 2  # s0 and s4 had 4 candidates


def test_evaluation_needs_two_patients() -> None:
    with pytest.raises(ValueError, match="at least 2 patients"):
        evaluate(_circle()[:2], ["A", "B"], ["p", "p"], ["a", "b"], k=1)


# A shared offset b dominates every vector; the class is the direction of the deviation from it, and slides differ
# in how far they deviate: A0 and B0 a little (0.1, to either side), A1 and B1 a lot (3). Raw cosine sees the two
# weak slides as nearly the same point (both lie next to b); after subtracting the mean (= b, the deviations
# cancel) only the direction of the deviation counts.
def _offset_vectors() -> tuple[np.ndarray, list[str], list[str]]:
    rng = np.random.default_rng(0)
    b = np.zeros(16)
    b[0] = 10.0
    direction = np.zeros(16)
    direction[1] = 1.0
    ids, labels, vectors = [], [], []
    for label, sign in (("A", 1.0), ("B", -1.0)):
        for i, r in enumerate((0.1, 3.0)):
            vectors.append(b + sign * r * direction + rng.normal(0, 1e-4, 16))
            ids.append(f"{label}{i}")
            labels.append(label)
    return np.array(vectors), labels, ids


def test_centring_ranks_by_deviation_from_the_shared_offset() -> None:
    vectors, labels, ids = _offset_vectors()
    raw = evaluate(vectors, labels, ids, ids, k=1, centring="none")
    centred = evaluate(vectors, labels, ids, ids, k=1, centring="mean")
    nn = lambda report: dict(zip(report.queries.slide_id, (n[0] for n in report.queries.neighbours)))
    # raw: angles from b are 0.01 (A0), 0.29 (A1), -0.01 (B0), -0.29 (B1): the weak slides find each other
    assert nn(raw) == {"A0": "B0", "B0": "A0", "A1": "A0", "B1": "B0"}
    assert raw.metrics()["mv_at_1"] == 0.5
    assert nn(centred) == {"A0": "A1", "A1": "A0", "B0": "B1", "B1": "B0"}
    assert centred.metrics()["mv_at_1"] == 1.0
    # centred cosine is cosine of (x - mean), computed by hand
    c = vectors - vectors.mean(axis=0)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    d = 1 - c @ c.T
    np.fill_diagonal(d, np.inf)
    assert [ids[j] for j in d.argmin(axis=1)] == [nn(centred)[i] for i in ids]
    np.testing.assert_allclose([centred.queries.distances[i][0] for i in range(4)], d.min(axis=1), atol=1e-9)


def _slide_table(tmp_path, vectors: np.ndarray, ids: list[str], labels: list[str]):
    spec = TableSpec("fv-test", SLIDE_KIND, vectors.shape[1], "models:/x/1", ("subtype",))
    table = open_table(connect(tmp_path / "lance"), spec)
    batch = to_batch(spec, {"slide_id": ids, "patient_id": ids, "n_tiles": [1] * len(ids), "subtype": labels,
                            "vector": vectors})
    upsert_slides(table, spec, batch, ids)
    return table


def test_centred_slide_search_on_a_table(tmp_path) -> None:
    from histcode.config import FeaturesConfig

    vectors, labels, ids = _offset_vectors()
    table = _slide_table(tmp_path, vectors, ids, labels)
    hits = nearest_slides(table, "A0", 2, None, "mean")
    assert hits.column_names == ["rank", "slide_id", "patient_id", "n_tiles", "subtype", "distance"]
    assert hits.column("slide_id").to_pylist()[0] == "A1" and hits.column("rank").to_pylist() == [1, 2]
    raw = nearest_slides(table, "A0", 5, None, "none")
    assert raw.column("slide_id").to_pylist() == ["B0", "A1", "B1"]  # the query is never returned
    lance = nearest(table, vectors[0].astype(np.float32), 5, "slide_id != 'A0'", FeaturesConfig())
    assert raw.column("slide_id").to_pylist() == lance.column("slide_id").to_pylist()  # raw = Lance's flat cosine
    np.testing.assert_allclose(raw.column("distance").to_numpy(), lance.column("distance").to_numpy(), atol=1e-5)
    # the filter restricts the candidates, not the centre
    only_b = nearest_slides(table, "A0", 10, "subtype = 'B'", "mean")
    c = vectors - vectors.mean(axis=0)
    cos = lambda i, j: 1 - c[i] @ c[j] / np.linalg.norm(c[i]) / np.linalg.norm(c[j])
    assert only_b.column("slide_id").to_pylist() == sorted(["B0", "B1"], key=lambda s: cos(0, ids.index(s)))
    np.testing.assert_allclose(only_b.column("distance").to_numpy(), sorted([cos(0, 2), cos(0, 3)]), atol=1e-5)
    assert nearest_slides(table, "A0", 3, "subtype = 'Z'", "mean").num_rows == 0
    with pytest.raises(SearchError, match="has no vector"):
        nearest_slides(table, "nope", 3, None, "mean")
    with pytest.raises(SearchError, match=r"cannot filter .* by .no_such_column = 1.: .*No field named no_such_column \(columns: slide_id, "):
        nearest_slides(table, "A0", 3, "no_such_column = 1", "mean")
    with pytest.raises(ValueError, match="centring must be"):
        nearest_slides(table, "A0", 3, None, "whiten")


# -- a real embedded workspace --------------------------------------------------------------------------------
def _view(ws):
    return load_view(Catalog.of(ws), None, ws.config().features.attribute_columns)


def test_slide_search_is_centred_by_default(embedded_workspace) -> None:
    ws = embedded_workspace
    view, cfg = _view(ws), ws.config().features
    slides = slide_features(ws, view, fmt="pandas")
    matrix = np.stack(slides.vector).astype(np.float64)
    query = slides.slide_id.iloc[0]
    hits = search(ws, view, cfg, slide_id=query, k=50)
    c = matrix - matrix.mean(axis=0)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    dist = 1 - c[1:] @ c[0]
    order = np.argsort(dist, kind="stable")
    assert hits.column("slide_id").to_pylist() == slides.slide_id.iloc[1:].iloc[order].tolist()
    np.testing.assert_allclose(hits.column("distance").to_numpy(), dist[order], atol=1e-5)
    raw = search(ws, view, cfg, slide_id=query, k=50, centring="none")
    assert raw.column("distance").to_numpy().max() < hits.column("distance").to_numpy().max()


def test_evaluate_view_writes_an_mlflow_run(embedded_workspace, copy_workspace) -> None:
    ws = copy_workspace(embedded_workspace)
    view = _view(ws)
    report = evaluate_view(ws, view, by="tissue", k=5)
    slides = slide_features(ws, view, fmt="pandas").set_index("slide_id")
    tissue = slide_labels(slides.reset_index(), "tissue")
    assert set(report.queries.label) == set(tissue.dropna()) and len(report.queries) == tissue.notna().sum()
    patient = slides.patient_id.to_dict()
    for sid, neighbours in zip(report.queries.slide_id, report.queries.neighbours):
        assert neighbours and all(patient[n] != patient[sid] for n in neighbours)  # no slide of the same patient
    run_id = log_retrieval(Tracker(ws), view, report)
    client = MlflowClient(tracking_uri=ws.mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "retrieval"
    params = run.data.params
    assert params["view_id"] == view.view_id and params["encoder"] == view.encoder_uri
    assert params["label"] == "tissue" and params["k"] == "5" and params["centring"] == "mean"
    for key in ("mv_at_1", "mv_at_3", "mv_at_5", "mmv_at_5", "map_at_5"):
        value = run.data.metrics[key]
        assert math.isfinite(value) and 0.0 <= value <= 1.0, key
    assert any(key.startswith("normal/") for key in run.data.metrics)
    assert not runs_left_running(ws)
    by_subtype = evaluate_view(ws, view, by="subtype", k=3, centring="none")
    assert set(by_subtype.queries.label) <= {"LUAD", "LUSC"} and by_subtype.cutoffs == (1, 3)
    with pytest.raises(ValueError, match="no slide column 'nope'"):
        evaluate_view(ws, view, by="nope")


def test_search_evaluate_command(embedded_workspace, copy_workspace) -> None:
    workspace = copy_workspace(embedded_workspace)
    ws = workspace.root
    result = invoke(ws, "search", "--evaluate")
    assert result.exit_code == 0, result.output
    assert "MV@5" in result.stdout and "mAP@5" in result.stdout and "macro" in result.stdout
    assert "view fv-" in result.stderr and "MLflow run" in result.stderr
    result = invoke(ws, "search", "--evaluate", "--by", "subtype", "--k", "3", "--centring", "none", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["class"] for r in rows][-2:] == ["all", "macro"] and {"MV@1", "MV@3", "mAP@3"} <= set(rows[0])
    assert {r["class"] for r in rows[:-2]} <= {"LUAD", "LUSC"}
    client = MlflowClient(tracking_uri=workspace.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("retrieval").experiment_id])
    assert sorted((r.data.params["label"], r.data.params["k"], r.data.params["centring"]) for r in runs) == [
        ("subtype", "3", "none"), ("tissue", "5", "mean")]
    assert not runs_left_running(workspace)
    for args, message in ((["--by", "nope"], "no slide column"), (["--slide", "x"], "takes no --slide"),
                          (["--centring", "whiten"], "--centring must be")):
        result = invoke(ws, "search", "--evaluate", *args)
        assert result.exit_code == 2 and message in result.output, result.output
    result = invoke(ws, "search", "--tile", "x", "--centring", "none")
    assert result.exit_code == 2 and "slide search" in result.output


# -- attention-pooled slide vectors ---------------------------------------------------------------------------
def test_attention_weights_by_hand() -> None:
    from histcode.apps.slide_vectors import attention_weights

    assert np.allclose(attention_weights(np.array([1.0, 3.0])), [0.25, 0.75])
    assert np.allclose(attention_weights(np.array([0.0, 0.0, np.nan])), [1 / 3] * 3)  # no attention: uniform


def test_attention_pooling_weighs_tiles_by_the_tumour_head(headed_workspace, copy_workspace) -> None:
    """CLAM's pooling, v = sum_i a_i h_i with a = the tumour head's softmax attention over the slide's tiles,
    computed here from the registered model's own attention output."""
    import torch

    from histcode.apps.slide_vectors import PoolingError, slide_vectors
    from histcode.heads.data import load_bags

    ws = headed_workspace
    view = load_view(Catalog.of(ws))
    pooled = slide_vectors(ws, view, "attention")
    model = Tracker(ws).load_model("models:/histcode-tumor-head@attention")
    bags = load_bags(ws, view)
    assert set(pooled) == set(bags)
    for sid, bag in list(bags.items())[:4]:
        with torch.no_grad():
            _, a, _ = model(torch.from_numpy(bag.features))  # (outputs, attention, tile scores)
        assert abs(float(a.sum()) - 1) < 1e-4
        expected = (a.numpy()[:, None].astype(np.float64) * bag.features).sum(axis=0)
        assert np.allclose(pooled[sid], expected, atol=1e-5)
        assert not np.allclose(pooled[sid], bag.features.mean(axis=0), atol=1e-4)  # not the mean
    assert slide_vectors(ws, view, "mean") is None
    # retrieval and slide search take them; the run records the pooling
    workspace = copy_workspace(ws)
    result = invoke(workspace.root, "search", "--evaluate", "--pooling", "attention", "--k", "3")
    assert result.exit_code == 0, result.output
    assert "attention" in result.stdout and "pooling" in result.stdout  # the table's title (rich may wrap it)
    client = MlflowClient(tracking_uri=workspace.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("retrieval").experiment_id])
    assert [r.data.params["pooling"] for r in runs] == ["attention"]
    sid = sorted(bags)[0]
    hits = search(ws, view, ws.config().features, slide_id=sid, k=3, slide_vectors=pooled)
    assert hits.num_rows == 3 and sid not in hits.column("slide_id").to_pylist()
    with pytest.raises(PoolingError, match="pooling must be"):
        slide_vectors(ws, view, "max")
    # the demo's summary: both poolings evaluated and logged, then reused while nothing changed
    from histcode.apps.demo import slide_retrieval

    first = slide_retrieval(workspace, workspace.config(), view, reuse=False)
    assert set(first["poolings"]) == {"mean", "attention"} and not first.get("reused")
    assert 0 <= first["poolings"]["attention"]["mmv_at_5"] <= 1
    again = slide_retrieval(workspace, workspace.config(), view, reuse=True)
    assert again["reused"] and again["poolings"] == first["poolings"]
    runs = client.search_runs([client.get_experiment_by_name("retrieval").experiment_id])
    assert sorted(r.data.params["pooling"] for r in runs) == ["attention", "attention", "mean"]


def test_attention_pooling_without_a_tumour_head_says_what_to_run(embedded_workspace) -> None:
    result = invoke(embedded_workspace.root, "search", "--evaluate", "--pooling", "attention")
    assert result.exit_code == 2 and "attention pooling needs a gated-attention tumour head" in result.output
    result = invoke(embedded_workspace.root, "search", "--tile", "x", "--pooling", "attention")
    assert result.exit_code == 2 and "--pooling applies to slide search" in result.output
