"""Model selection with no test fold in it: the per-fold choice among aggregators, DE labels and gene choice
made from the training folds only, production aliases that move only to better versions, ablation aliases of
their own, and predict applying heads of different views each in its own view."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from histcode.config import HeadsConfig, LabelsConfig
from histcode.heads.cv import cross_validate
from histcode.heads.data import Bag
from histcode.heads.select import choose, select_per_fold
from histcode.heads.tasks import DE_CLASSES, TaskData

CFG = HeadsConfig(epochs=15, patience=4, lr=3e-3, bootstrap=20, k_sample=2)


def _class_task(y_flip: np.ndarray | None = None) -> tuple[TaskData, dict[str, Bag]]:
    """12 patients, one slide each, 3 folds; a weak signal so that the aggregators differ."""
    rng = np.random.default_rng(1)
    slides, patients, y, bags = [], [], [], {}
    for p in range(12):
        sid, label = f"P{p}", p % 2
        feats = rng.normal(size=(10, 6)).astype(np.float32)
        feats[:3] += label * 0.8  # a few informative tiles
        bags[sid] = Bag(sid, sid, feats, [f"{sid}-{i}" for i in range(10)], np.zeros((10, 2)), 256)
        slides.append(sid), patients.append(sid), y.append(label)
    y = np.array(y)
    if y_flip is not None:
        y = np.where(y_flip, 1 - y, y)
    folds = np.arange(12) % 3
    return TaskData("tumor", slides, np.array(patients), folds, y, ("normal", "tumor")), bags


def test_choice_ranks_validation_score_then_loss_then_order() -> None:
    assert choose({"attention": {"val_score": 0.8, "val_loss": 0.1}, "mean": {"val_score": 0.9, "val_loss": 0.5}},
                  ["attention", "mean"]) == "mean"
    assert choose({"attention": {"val_score": 1.0, "val_loss": 0.4}, "mean": {"val_score": 1.0, "val_loss": 0.2}},
                  ["attention", "mean"]) == "mean"
    nan = float("nan")
    assert choose({"attention": {"val_score": nan, "val_loss": nan}, "mean": {"val_score": nan, "val_loss": nan}},
                  ["attention", "mean"]) == "attention"  # nothing to go by: the configured order
    assert choose({"attention": {"val_score": nan, "val_loss": 0.3}, "mean": {"val_score": 0.6, "val_loss": 0.9}},
                  ["attention", "mean"]) == "mean"


def test_poisoned_test_fold_labels_leave_that_folds_selection_unchanged() -> None:
    """Fold 0's choice and predictions may depend on the training folds only: flipping every label of fold 0's
    test slides must change neither (the other folds train on those slides, so theirs may change)."""
    task, bags = _class_task()
    aggregators = ("attention", "mean", "max")
    clean = [cross_validate(task, bags, a, CFG) for a in aggregators]
    poisoned_task, _ = _class_task(y_flip=task.folds == 0)
    poisoned = [cross_validate(poisoned_task, bags, a, CFG) for a in aggregators]
    for c, p in zip(clean, poisoned):
        f0c, f0p = c.fold_metrics[0], p.fold_metrics[0]
        assert f0c["fold"] == f0p["fold"] == 0
        np.testing.assert_equal((f0c["val_score"], f0c["val_loss"]), (f0p["val_score"], f0p["val_loss"]))  # no test fold in it
        for sid in c.fold_slides[0]["test"]:
            np.testing.assert_array_equal(c.outputs[sid], p.outputs[sid])
    best_clean, best_poisoned = select_per_fold(clean, CFG), select_per_fold(poisoned, CFG)
    assert best_clean.fold_metrics[0]["aggregator"] == best_poisoned.fold_metrics[0]["aggregator"]
    # the procedure's pooled score is over the outer test folds, each predicted by its fold's choice
    test0 = best_clean.fold_slides[0]["test"]
    chosen = next(r for r in clean if r.aggregator == best_clean.fold_metrics[0]["aggregator"])
    for sid in test0:
        np.testing.assert_array_equal(best_clean.outputs[sid], chosen.outputs[sid])
    assert set(best_clean.outputs) == set(task.slide_ids) and "auc" in best_clean.pooled


def _de_task(poison: str | None = None) -> TaskData:
    """6 tumour patients (2 per fold) without matched normals, 3 normal-only patients (one per fold): every
    fold change is against the cohort-normal mean."""
    from histcode.heads.tasks import DETask

    genes = ("G1", "G2")
    tumours = {f"T{p}": [10.0 * (p + 1), 40.0 if p % 2 else 5.0] for p in range(6)}
    normals = {f"N{p}": [20.0, 10.0] for p in range(3)}
    if poison == "normal":
        normals["N0"] = [5000.0, 10.0]  # fold 0's normal sample: must not move any label fold 0 trains on
    if poison == "tumour":
        tumours["T0"] = [0.01, 0.01]  # a fold-0 tumour: must not change fold 0's choice of genes
    matrix = pd.DataFrame({**{f"S-{k}": v for k, v in tumours.items()}, **{f"S-{k}": v for k, v in normals.items()}},
                          index=list(genes))
    samples = pd.DataFrame([{"sample_id": f"S-{k}", "patient_id": k, "kind": "tumor", "slide_id": f"slide-{k}",
                             "problem": None} for k in tumours]
                           + [{"sample_id": f"S-{k}", "patient_id": k, "kind": "normal", "slide_id": None,
                               "problem": None} for k in normals])
    patient_fold = {**{f"T{p}": p // 2 for p in range(6)}, **{f"N{p}": p for p in range(3)}}
    lcfg = LabelsConfig(panel=genes, min_class_size=1, control_genes=("G2",))
    slides = [f"slide-T{p}" for p in range(6)]
    source = {"lcfg": lcfg, "matrix": matrix, "samples": samples, "patient_fold": patient_fold,
              "gate_included": np.array([True, True])}
    data = TaskData("de", slides, np.array([f"T{p}" for p in range(6)]), np.array([p // 2 for p in range(6)]),
                    np.zeros((6, 2), dtype=np.float32), DE_CLASSES, genes, np.zeros((6, 2), dtype=int),
                    np.array([True, True]), np.zeros(2), np.array([False, True]), source=source)
    return DETask().for_fold(data, -1) if poison is None else data


def test_de_reference_and_gene_choice_come_from_the_training_folds_only() -> None:
    from histcode.heads.tasks import DETask

    kind = DETask()
    clean, bad_normal, bad_tumour = _de_task(), _de_task("normal"), _de_task("tumour")
    train = clean.folds != 0
    f_clean, f_normal = kind.for_fold(clean, 0), kind.for_fold(bad_normal, 0)
    # every slide's label in fold 0's view is computed against the mean of the normals of folds 1 and 2
    expected = np.log2((10.0 * np.arange(1, 7) + 1) / (20.0 + 1))
    np.testing.assert_allclose(f_clean.y[:, 0], expected, rtol=1e-5)
    np.testing.assert_array_equal(f_clean.y, f_normal.y)  # fold 0's normal sample does not reach them
    assert not np.allclose(kind.for_fold(bad_normal, 1).y[train], f_clean.y[train])  # fold 1 does use it
    f_tumour = kind.for_fold(bad_tumour, 0)
    np.testing.assert_array_equal(f_clean.gene_included, f_tumour.gene_included)
    np.testing.assert_array_equal(f_clean.y_class[train], f_tumour.y_class[train])
    tested = kind.tested(clean)
    for k in range(3):  # each slide is scored against the labels its own test fold's training defines
        rows = clean.folds == k
        np.testing.assert_array_equal(tested.y[rows], kind.for_fold(clean, k).y[rows])


def test_control_genes_are_scored_apart_from_the_rest() -> None:
    from histcode.heads.tasks import DETask

    data = DETask().for_fold(_de_task(), -1)
    outputs = [np.stack([np.r_[fc, 0.1, 0.8, 0.1] for fc in row]) for row in data.y]  # perfect log2FC
    outputs[0][1, 0] = -5.0  # spoil the control gene's fold change on one slide
    score = DETask().score(data, np.arange(len(data.slide_ids)), outputs)
    assert score["mean_gene_pearson"] == pytest.approx(1.0)  # the signal gene only
    assert "control_mean_gene_pearson" in score and score["control_mean_gene_pearson"] < 1.0


# --- the registry: production aliases, ablation aliases, heads of several views in predict -----------------


def _aliases(ws) -> dict[tuple[str, str], str]:
    from mlflow import MlflowClient

    from histcode.heads.names import MODEL_NAMES

    client = MlflowClient(tracking_uri=ws.mlflow_uri, registry_uri=ws.mlflow_uri)
    return {(task, alias): version for task, name in MODEL_NAMES.items()
            for alias, version in client.get_registered_model(name).aliases.items()}


def test_promotion_moves_aliases_only_to_better_versions(headed_workspace, copy_workspace) -> None:
    from histcode.apps.head_runs import promote
    from histcode.tracking import Tracker

    ws = copy_workspace(headed_workspace)
    tracker = Tracker(ws)
    before = _aliases(ws)
    version = before[("tumor", "best")]
    label_version = tracker.client.get_model_version("histcode-tumor-head", version).tags["label_version"]
    held = float(tracker.client.get_model_version("histcode-tumor-head", version).tags["selection_score"])
    other = before[("tumor", "mean")] if before[("tumor", "mean")] != version else before[("tumor", "attention")]
    worse = promote(tracker, "tumor", "best", other, held - 0.1, label_version, "selection_score")
    equal = promote(tracker, "tumor", "best", other, held, label_version, "selection_score")
    assert not worse.moved and not equal.moved and _aliases(ws)[("tumor", "best")] == version
    assert promote(tracker, "tumor", "best", other, held - 0.1, "ls-other", "selection_score").moved  # new label set
    assert _aliases(ws)[("tumor", "best")] == other
    assert promote(tracker, "tumor", "best", version, 0.0, "ls-other", "selection_score", force=True).moved


def test_ablation_and_a_worse_rerun_leave_production_aliases_on_better_versions(headed_workspace, copy_workspace,
                                                                                tmp_path) -> None:
    import yaml

    from histcode.apps.ablation import run_ablation
    from histcode.apps.predict import predict_slides
    from histcode.apps.train_heads import train_heads
    from histcode.config import DemoConfig
    from histcode.demo.build import build_demo_cohort
    from histcode.ingest.sources import SlideSource
    from histcode.store.catalog import Catalog
    from histcode.tracking import Tracker

    ws = copy_workspace(headed_workspace)
    before = _aliases(ws)
    reports = run_ablation(ws, ws.config(), ("random",), ("mean", "attention"), ("tumor", "subtype"))
    after = _aliases(ws)
    assert {k: v for k, v in after.items() if not k[1].startswith("ablation-")} == before  # production untouched
    assert {("tumor", "ablation-random-mean"), ("tumor", "ablation-random-best"),
            ("subtype", "ablation-random-attention")} <= set(after)
    random_view = reports[0].view.view_id

    # a worse production run on the same label set: heads that barely train
    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    params["heads"].update({"epochs": 1, "lr": 1e-7})
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params))
    report = train_heads(ws, ws.config(), ("tumor",), ("attention", "mean"), force=True)
    client = Tracker(ws).client
    for p in report.promotions["tumor"]:
        old = client.get_model_version("histcode-tumor-head", before[("tumor", p.alias)]).tags
        new = client.get_model_version("histcode-tumor-head", report.versions[f"tumor/{p.alias}"]).tags
        score_tag = "selection_score" if p.alias == "best" else "cv_score"
        if p.moved:  # only ever to a strictly better version
            assert float(new[score_tag]) > float(old[score_tag])
        else:
            assert _aliases(ws)[("tumor", p.alias)] == before[("tumor", p.alias)]
    assert not next(p for p in report.promotions["tumor"] if p.alias == "mean").moved  # same data: same score

    # subtype@best promoted by request onto the random encoder's view: predict embeds in both views
    train_heads(ws, ws.config().model_copy(update={"heads": ws.config().heads.model_copy(update={"promote": True})}),
                ("subtype",), ("mean",), view_id=random_view)
    fresh = build_demo_cohort(DemoConfig(n_patients=2, canvas_cells=(6, 8), seed=41, fraction_40x=0.0,
                                         fraction_generic_tiff=0.0), tmp_path / "new", progress=False)
    manifest = pd.read_csv(fresh.manifest)
    sources = [SlideSource(fresh.out_dir / r.path, "VIEWS-" + r.slide_id, "VIEWS-" + r.patient_id)
               for r in manifest.itertuples()]
    result = predict_slides(ws, ws.config(), sources, progress=False)
    assert (result.predictions.status == "ok").all(), result.predictions.reason.tolist()
    assert len(set(result.views.values())) == 2 and random_view in result.views.values()
    done = Catalog.of(ws).query("SELECT view_id, count(*) AS n FROM materializations WHERE slide_id LIKE 'VIEWS-%' "
                                "AND status = 'ok' GROUP BY 1")
    assert {r["view_id"] for r in done} == set(result.views.values())
    assert result.predictions.p_luad.between(0, 1).all()
    assert {"ood_score", "ood_percentile", "in_distribution"} <= set(result.predictions.columns)
    assert result.predictions.ood_percentile.between(0, 1).all()
