"""Heads: attention properties, leakage-free folds, real CV on the demo cohort, the registry, heatmaps, predict."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from histcode.config import HeadsConfig
from histcode.heads.apply import load_head
from histcode.heads.cv import cross_validate
from histcode.heads.data import Bag
from histcode.heads.tasks import TaskData
from histcode.heads.models import CLAMSingleBranch, GatedAttention, MultiTaskDE
from histcode.store.catalog import Catalog
from histcode.tracking import Tracker


def test_gated_attention_sums_to_one_and_ignores_tile_order() -> None:
    torch.manual_seed(0)
    model = CLAMSingleBranch(16, 2, k_sample=2).eval()
    bag = torch.randn(11, 16)
    perm = torch.randperm(11)
    with torch.no_grad():
        p, a = model(bag)
        p2, a2 = model(bag[perm])
    assert float(a.sum()) == pytest.approx(1.0, abs=1e-6) and (a >= 0).all()
    torch.testing.assert_close(p, p2)  # the slide prediction does not depend on tile order
    torch.testing.assert_close(a[perm], a2)  # each tile keeps its own weight
    assert GatedAttention(16, 8).eval()(torch.randn(1, 16)).item() == pytest.approx(1.0)  # a one-tile bag
    de = MultiTaskDE(16, 5).eval()
    with torch.no_grad():
        out, att = de(bag)
    assert out.shape == (5, 4) and torch.allclose(out[:, 1:].sum(dim=1), torch.ones(5)) and float(att.sum()) == pytest.approx(1)


def clam_reference_loss(model: CLAMSingleBranch, bag: torch.Tensor, label: int, k: int, subtyping: bool) -> float:
    """CLAM_SB's loss with instance evaluation, written from CLAM's forward (Lu et al. 2021, mahmoodlab/CLAM:
    inst_eval for the slide's class, inst_eval_out for the others when subtyping, the instance loss divided by
    the number of classifiers when subtyping, total = bag_weight * bag + (1 - bag_weight) * instance)."""
    import torch.nn.functional as F

    h = model.fc(bag)
    A = model.attention(h)  # softmax over the tiles
    bag_loss = F.cross_entropy(model.classifier((A[:, None] * h).sum(dim=0))[None], torch.tensor([label]))
    total_inst_loss = 0.0
    for i, classifier in enumerate(model.instance_classifiers):
        if i == label:
            top_p_ids, top_n_ids = torch.topk(A, k)[1], torch.topk(-A, k)[1]
            instances = torch.cat([h[top_p_ids], h[top_n_ids]])
            targets = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)])
            total_inst_loss += F.cross_entropy(classifier(instances), targets)
        elif subtyping:
            top_p_ids = torch.topk(A, k)[1]
            total_inst_loss += F.cross_entropy(classifier(h[top_p_ids]), torch.zeros(k, dtype=torch.long))
    if subtyping:
        total_inst_loss /= len(model.instance_classifiers)
    return float(model.bag_weight * bag_loss + (1 - model.bag_weight) * total_inst_loss)


@pytest.mark.parametrize("subtyping", [False, True])
@pytest.mark.parametrize("label", [0, 1, 2])
def test_clam_loss_equals_clams_instance_evaluation(subtyping: bool, label: int) -> None:
    torch.manual_seed(label)
    model = CLAMSingleBranch(8, 3, k_sample=3, subtyping=subtyping).eval()  # no dropout: comparable
    bag = torch.randn(10, 8)
    with torch.no_grad():
        assert float(model.loss(bag, label)) == pytest.approx(clam_reference_loss(model, bag, label, 3, subtyping), rel=1e-5)
    model.loss(bag, label).backward()
    trained = [c.weight.grad is not None for c in model.instance_classifiers]
    assert trained == [True] * 3 if subtyping else trained == [c == label for c in range(3)]


def test_clam_one_tile_bag_never_labels_a_tile_both_ways() -> None:
    torch.manual_seed(0)
    for subtyping in (False, True):
        model = CLAMSingleBranch(8, 2, k_sample=8, subtyping=subtyping)
        loss = model.loss(torch.randn(1, 8), 1)
        assert torch.isfinite(loss)
        loss.backward()
        assert model.instance_classifiers[1].weight.grad is None  # in-class: no top and bottom tile to tell apart
        assert (model.instance_classifiers[0].weight.grad is not None) == subtyping  # out-of-class: top tile negative


def _synthetic_task(n_patients: int = 10, slides_per_patient: int = 2) -> tuple[TaskData, dict[str, Bag]]:
    rng = np.random.default_rng(0)
    slides, patients, y, bags = [], [], [], {}
    for p in range(n_patients):
        for s in range(slides_per_patient):
            sid, label = f"P{p}-S{s}", (p + s) % 2
            feats = rng.normal(size=(12, 8)).astype(np.float32) + label * 1.5
            bags[sid] = Bag(sid, f"P{p}", feats, [f"{sid}-t{i}" for i in range(12)], np.zeros((12, 2)), 256)
            slides.append(sid), patients.append(f"P{p}"), y.append(label)
    folds = np.array([int(p[1:]) % 3 for p in patients])  # planned by patient, as the gate does
    return TaskData("tumor", slides, np.array(patients), folds, np.array(y), ("normal", "tumor")), bags


@pytest.mark.parametrize("aggregator", ["attention", "max", "mean"])
def test_folds_never_share_patients_and_never_stop_on_the_test_fold(aggregator: str) -> None:
    task, bags = _synthetic_task()
    result = cross_validate(task, bags, aggregator, HeadsConfig(epochs=30, patience=5, lr=3e-3, bootstrap=20, k_sample=2))
    patient = dict(zip(task.slide_ids, task.patients))
    assert len(result.fold_slides) == 3
    for fold in result.fold_slides:
        test_p = {patient[s] for s in fold["test"]}
        held = fold["stop"] + fold["select"]
        assert not test_p & {patient[s] for s in fold["train"] + held}  # no patient leaks
        assert fold["select"] and not set(held) & set(fold["test"])  # stopping and choosing never see the test fold
        assert bool(fold["stop"]) == (aggregator != "mean")  # a linear head fits on the stopping split too
        assert set(held) <= set(task.slide_ids) - set(fold["test"])
        assert not {patient[s] for s in held} & {patient[s] for s in fold["train"]}
    assert result.pooled["auc"] > 0.9  # the signal is strong: every aggregator must find it


def test_tumour_auc_on_the_demo_cohort_is_far_above_chance(headed_workspace) -> None:
    summary = json.loads((headed_workspace.metrics_dir / "heads.json").read_text())
    runs = summary["runs"]
    assert runs["tumor/mean"]["auc"] >= 0.85 and runs["tumor/attention"]["auc"] >= 0.75
    assert set(summary["best"]) == {"tumor", "subtype", "de", "survival"} and "mean_gene_auc" in runs["de/attention"]
    assert "tumor/guided" not in runs and runs["subtype/guided"]["version"] and "mean_gene_auc" in runs["de/guided"]
    from mlflow import MlflowClient

    uri = headed_workspace.mlflow_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(runs["tumor/attention"]["run_id"])
    assert parent.data.tags["histcode.lance_tag"].startswith("heads-ls-") and "auc" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3  # one child run per fold
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"roc.png", "confusion.png", "predictions.csv", "label_gate_data_docs", "attention.npz"} <= artifacts
    version = client.get_model_version("histcode-tumor-head", runs["tumor/attention"]["version"])
    assert version.run_id == parent.info.run_id  # the registered head is the one this parent run trained
    de_artifacts = {a.path for a in client.list_artifacts(runs["de/attention"]["run_id"])}
    assert {"genes.csv", "fold_change_vs_auc.png"} <= de_artifacts
    roc = pd.read_csv(headed_workspace.metrics_dir / "plots" / "roc" / "tumor_attention.csv")  # for `dvc plots show`
    assert roc.tpr.between(0, 1).all() and roc.tpr.iloc[-1] == 1 and roc.fpr.is_monotonic_increasing
    genes = pd.read_csv(headed_workspace.metrics_dir / "plots" / "genes" / "de_attention.csv")
    assert {"gene", "mean_abs_log2fc", "auc", "pearson", "spearman"} <= set(genes.columns)


def test_registry_round_trip(headed_workspace) -> None:
    tracker = Tracker(headed_workspace)
    head = load_head(tracker, "tumor", "attention")
    assert head.aggregator == "attention" and head.classes == ("normal", "tumor")
    from histcode.apps.heatmaps import slide_bag

    sid = Catalog(headed_workspace.catalog_path).query("SELECT slide_id FROM slide_labels ORDER BY 1 LIMIT 1")[0]["slide_id"]
    bag = slide_bag(headed_workspace, head, sid)
    for n in (1, len(bag.features)):
        probs, att = head(bag.features[:n])
        assert probs.shape == (2,) and probs.sum() == pytest.approx(1, abs=1e-5) and att.shape == (n,)
    best = load_head(tracker, "de", "best")
    out, _ = best(bag.features)
    assert out.shape == (len(best.genes), 4)


@pytest.mark.parametrize(("task", "aggregator"), [(t, a) for t in ("tumor", "subtype", "de") for a in ("attention", "mean")]
                         + [("subtype", "guided"), ("de", "guided")])
def test_registered_heads_score_every_tile_in_one_pass_as_bags_of_one(headed_workspace, task: str,
                                                                     aggregator: str) -> None:
    """The exported head's per-tile output is, for each tile, what the head says of a bag of that tile alone
    (class probabilities; DE: each gene's log2FC), for all tiles at once."""
    from histcode.apps.heatmaps import slide_bag

    head = load_head(Tracker(headed_workspace), task, aggregator)
    sid = Catalog(headed_workspace.catalog_path).query("SELECT slide_id FROM slide_labels ORDER BY 1 LIMIT 1")[0]["slide_id"]
    features = slide_bag(headed_workspace, head, sid).features
    batched = head.tile_scores(features)
    alone = np.stack([head(features[i:i + 1])[0] for i in range(len(features))])
    if task == "de":
        alone = alone[:, :, 0]
    assert batched.shape == alone.shape == (len(features), len(head.genes) if task == "de" else len(head.classes))
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-5)


def test_heatmap_with_mask_auc_and_sql_scores(headed_workspace, copy_workspace) -> None:
    from histcode.apps.heatmaps import render_heatmaps
    from histcode.store.sql import run_sql

    ws = copy_workspace(headed_workspace)
    labels = Catalog.of(ws).query("SELECT slide_id FROM slide_labels WHERE tumor ORDER BY 1")
    sid = labels[0]["slide_id"]
    result = render_heatmaps(ws, sid, ws.outputs_dir / "heatmaps")
    assert all(p.is_file() and p.stat().st_size > 1000 for p in result.pictures) and len(result.pictures) >= 2
    assert result.mask_auc is not None and 0 <= result.mask_auc <= 1  # the demo slides carry tumour masks
    scores = run_sql(ws, f"SELECT score_name, count(*) AS n FROM tile_scores WHERE slide_id = '{sid}' GROUP BY 1").to_pylist()
    assert {r["score_name"] for r in scores} >= {"attention"} and all(r["n"] > 0 for r in scores)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=ws.mlflow_uri)
    drawings = lambda: len(client.search_runs([client.get_experiment_by_name("heatmaps").experiment_id]))  # noqa: E731
    before = drawings()
    again = render_heatmaps(ws, sid, ws.outputs_dir / "heatmaps")  # same heads, same genes: not drawn again
    assert again.pictures == result.pictures and again.mask_auc == pytest.approx(result.mask_auc)
    assert len(again.scores) == len(result.scores) and drawings() == before
    render_heatmaps(ws, sid, ws.outputs_dir / "heatmaps", force=True)
    assert drawings() == before + 1


def test_predict_on_new_slides_including_40x_and_failures(headed_workspace, copy_workspace, tiny_cohort, tmp_path) -> None:
    from histcode.config import DemoConfig
    from histcode.demo.build import build_demo_cohort
    from histcode.apps.predict import predict_slides
    from histcode.ingest.sources import read_manifest

    ws = copy_workspace(headed_workspace)
    fresh = build_demo_cohort(DemoConfig(n_patients=2, canvas_cells=(6, 8), seed=99, fraction_40x=0.5,
                                         fraction_generic_tiff=0.0), tmp_path / "new", progress=False)
    manifest = pd.read_csv(fresh.manifest)
    manifest["slide_id"] = "NEW-" + manifest.slide_id  # slides the heads never saw
    (tmp_path / "empty.svs").write_bytes(b"")
    rows = [*manifest.assign(path=manifest.path.map(lambda p: str(fresh.out_dir / p))).to_dict("records"),
            {"path": str(tmp_path / "empty.svs"), "slide_id": "NEW-broken"}]
    pd.DataFrame(rows).to_csv(tmp_path / "predict.csv", index=False)
    result = predict_slides(ws, ws.config(), read_manifest(tmp_path / "predict.csv"), progress=False)
    preds = result.predictions.set_index("slide_id")
    assert preds.loc["NEW-broken", "status"] == "failed" and preds.loc["NEW-broken", "reason"] == "empty file (0 bytes)"
    ok = preds[preds.status == "ok"]
    assert len(ok) == len(manifest) and ok.p_tumor.between(0, 1).all()
    assert {"p_luad", "p_lusc"} <= set(preds.columns) and any(c.startswith("de_") for c in preds.columns)
    slides = pd.read_csv(fresh.out_dir / "slides.csv")
    assert (slides.magnification == 40).any()  # a 40x slide was predicted at the same physical scale
    tiles = result.tile_scores
    assert list(tiles.columns) == ["slide_id", "x", "y", "size", "attention", "attention_raw"]
    assert set(tiles.slide_id) == set(ok.index)
    forty = "NEW-" + slides.loc[slides.magnification == 40, "slide_id"].iloc[0]
    assert (tiles[tiles.slide_id == forty]["size"] == 512).all()  # level-0 pixels of a 0.25 um/px slide
    for sid, group in tiles.groupby("slide_id"):
        assert group.attention.sum() == pytest.approx(1.0, abs=1e-4)


def test_ablation_grid_gives_comparable_runs_per_encoder(headed_workspace, copy_workspace) -> None:
    from mlflow import MlflowClient

    from histcode.apps.ablation import run_ablation

    ws = copy_workspace(headed_workspace)
    reports = run_ablation(ws, ws.config(), ("random", "moco"), ("mean",), ("tumor",))
    assert [r.view.method for r in reports] == ["random", "moco"] and len({r.view.view_id for r in reports}) == 2
    client = MlflowClient(tracking_uri=ws.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("heads").experiment_id],
                              "tags.histcode.task = 'tumor' and tags.histcode.aggregator = 'mean'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert {r.data.tags["histcode.method"] for r in parents} >= {"random", "moco"}
    assert all("auc" in r.data.metrics for r in parents)  # one metric to compare them by in the UI
    assert len({frozenset(r.data.params) for r in parents}) == 1  # the same parameters, different values


def test_strict_metrics_pool_only_the_folds_the_encoder_never_saw() -> None:
    from sklearn.metrics import roc_auc_score

    task, bags = _synthetic_task()
    result = cross_validate(task, bags, "mean", HeadsConfig(bootstrap=20), strict_folds=frozenset({1}))
    fold1 = result.predictions[result.predictions.fold == 1]
    assert result.strict["auc"] == pytest.approx(roc_auc_score(fold1.y, fold1.p_tumor))
    assert cross_validate(task, bags, "mean", HeadsConfig(bootstrap=20)).strict == {}


def test_standardised_heads_see_the_training_tiles_mean_and_sd() -> None:
    from histcode.heads.fit import Standardised, tile_statistics

    rng = np.random.default_rng(3)
    bags = [rng.normal(5.0, 3.0, size=(n, 4)).astype(np.float32) for n in (3, 7, 11)]
    mean, sd = tile_statistics(bags)
    tiles = np.concatenate(bags)
    np.testing.assert_allclose(mean, tiles.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(sd, tiles.std(axis=0, ddof=1), rtol=1e-5)
    assert tile_statistics([np.ones((3, 2), np.float32)])[1].tolist() == [1.0, 1.0]  # constant feature: sd 1
    inner = CLAMSingleBranch(4, 2, k_sample=1).eval()
    model = Standardised(inner, mean, sd).eval()
    bag = torch.from_numpy(bags[1])
    with torch.no_grad():
        expected = inner((bag - torch.from_numpy(mean)) / torch.from_numpy(sd))
        got = model(bag)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_balanced_sampling_draws_each_class_equally_often() -> None:
    from histcode.heads.fit import epoch_order

    classes = np.array([0] * 18 + [1] * 2)  # 9 : 1
    rng = np.random.default_rng(0)
    drawn = np.concatenate([classes[epoch_order(rng, 20, classes, True)] for _ in range(500)])
    assert abs(drawn.mean() - 0.5) < 0.03  # each bag drawn with probability 1 / (2 * its class's size)
    order = epoch_order(np.random.default_rng(0), 20, classes, False)
    assert sorted(order.tolist()) == list(range(20))  # unbalanced: a permutation


def test_early_stopping_waits_for_min_epochs() -> None:
    from histcode.heads.fit import fit_head
    from histcode.heads.tasks import TASKS

    task, bags = _synthetic_task(n_patients=6)
    pairs = [(bags[s].features, int(y)) for s, y in zip(task.slide_ids, task.y)]
    cfg = HeadsConfig(epochs=30, min_epochs=12, patience=1, lr=1e-2, k_sample=2)
    head = fit_head(TASKS["tumor"], "attention", pairs[:8], pairs[8:], task.shape, cfg, 0)
    assert head.epochs >= 12


def test_several_bags_per_step_make_one_optimiser_step_each(monkeypatch) -> None:
    """bags_per_step B: an epoch of n bags makes ceil(n / B) optimiser steps, on the mean loss of its bags."""
    from histcode.heads.fit import fit_head
    from histcode.heads.tasks import TASKS

    task, bags = _synthetic_task(n_patients=6)
    pairs = [(bags[s].features, int(y)) for s, y in zip(task.slide_ids, task.y)]
    steps = []
    original = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (steps.append(1), original(self, *a, **k))[1])
    for per_step in (1, 3):
        steps.clear()
        cfg = HeadsConfig(epochs=4, min_epochs=4, patience=10, lr=1e-2, k_sample=2, bags_per_step=per_step,
                          balanced_sampling=False)
        head = fit_head(TASKS["tumor"], "attention", pairs[:8], pairs[8:], task.shape, cfg, 0)
        assert len(steps) == head.epochs * -(-8 // per_step)


def test_tumour_auc_is_reported_per_tumour_fraction_bin() -> None:
    from histcode.heads.strata import fraction_strata

    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.3, 0.9, 0.8, 0.95])
    fraction = np.array([0, 0, 0, 0.02, 0.03, 0.5, 1.0])
    out = fraction_strata(y, p, fraction, (0.05, 0.2))
    # small foci (0.3, 0.9) against normals (0.1, 0.2, 0.6): pairs won 2 + 3 of 6
    assert out["auc_tf_00_05"] == pytest.approx(5 / 6) and out["n_tf_00_05"] == 2
    assert "auc_tf_05_20" not in out and out["n_tf_05_20"] == 0  # no slide in the bin: no AUC
    assert out["auc_tf_20_100"] == 1.0 and out["n_tf_20_100"] == 2  # a fraction of 1.0 is in the last bin


def test_standardise_is_per_task_and_scale_does_not_centre() -> None:
    """``heads.standardise`` per task: the tumour head (default ``scale``) divides by one sd of the training tiles
    without centring them; ``global`` centres on their mean; a task the mapping omits is centred."""
    import numpy as np

    from histcode.config import HeadsConfig
    from histcode.heads.fit import fit_head
    from histcode.heads.tasks import TASKS

    cfg = HeadsConfig(epochs=1, min_epochs=1)
    assert (cfg.standardise_for("tumor"), cfg.standardise_for("subtype"), cfg.standardise_for("de")) == (
        "scale", "global", "global")
    assert HeadsConfig(standardise={"tumor": "none"}).standardise_for("subtype") == "global"
    assert HeadsConfig(standardise="feature").standardise_for("tumor") == "feature"
    rng = np.random.default_rng(0)
    pairs = [((rng.normal(size=(12, 8)) * 3 + 5).astype(np.float32), i % 2) for i in range(6)]
    tiles = np.concatenate([b for b, _ in pairs])
    sd = np.sqrt(tiles.var(axis=0, ddof=1).mean())
    for mode, mean in (("scale", np.zeros(8)), ("global", tiles.mean(axis=0))):
        hcfg = cfg.model_copy(update={"standardise": {"tumor": mode}})
        model = fit_head(TASKS["tumor"], "attention", pairs, pairs[:2], {"classes": 2}, hcfg, 0).model
        np.testing.assert_allclose(model.mean.numpy(), mean, atol=1e-4)
        np.testing.assert_allclose(model.scale.numpy(), np.full(8, sd), rtol=1e-4)
    none = fit_head(TASKS["tumor"], "attention", pairs, pairs[:2], {"classes": 2},
                    cfg.model_copy(update={"standardise": "none"}), 0).model
    assert not hasattr(none, "mean")
