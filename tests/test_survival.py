"""The survival task: its metrics against hand-worked cases and brute force, the clinical readers' refusals, the
label gate's survival checks and refusal, the demo's simulated follow-up, and survival heads that learn and are
reported, registered, stored and drawn like the other tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import stats

from histcode.config import HeadsConfig
from histcode.heads import survival_metrics as sm
from histcode.heads.models import cox_loss
from histcode.labels.survival import SurvivalFileError, read_survival

# --- metrics against the definitions -----------------------------------------------------------------------------


def test_c_index_on_hand_worked_cases() -> None:
    # comparable pairs (earlier time an event): (0,1) (0,2) (0,3) (1,2) (1,3); risk falls with time: all concordant
    assert sm.c_index([1, 2, 3, 4], [1, 1, 0, 1], [4, 3, 2, 1]) == 1.0
    assert sm.c_index([1, 2, 3, 4], [1, 1, 0, 1], [1, 2, 3, 4]) == 0.0
    # risks 1, 1, 3, 0: (0,1) tie 1/2, (0,2) 0, (0,3) 1, (1,2) 0, (1,3) 1 -> 2.5 / 5
    assert sm.c_index([1, 2, 3, 4], [1, 1, 0, 1], [1, 1, 3, 0]) == 0.5
    # tied times are not comparable: only (0,2) and (1,2) count, one concordant
    assert sm.c_index([2, 2, 5], [1, 1, 1], [3, 1, 2]) == 0.5
    # a censored earliest patient is in no comparable pair as the earlier one
    assert sm.c_index([1, 2, 3], [0, 1, 0], [0, 5, 1]) == 1.0
    assert math.isnan(sm.c_index([1, 2], [0, 0], [1, 2]))


def _brute_c(time, event, risk) -> float:
    num = den = 0.0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and time[i] < time[j]:
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def test_c_index_matches_a_brute_force_pair_count_and_its_bootstrap_brackets_it() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        n = 40
        time = rng.integers(1, 15, n).astype(float)  # many tied times
        event = rng.random(n) < 0.6
        risk = rng.integers(0, 6, n).astype(float)  # many tied risks
        assert sm.c_index(time, event, risk) == pytest.approx(_brute_c(time, event, risk), abs=1e-12)
    lo, hi = sm.bootstrap_c_index(time, event, risk, np.arange(n), 200, 0)
    assert lo <= sm.c_index(time, event, risk) <= hi and hi - lo > 0.01
    # a resample is scored as its expanded rows: recompute one by brute force
    from histcode.heads.metrics import patient_resamples

    draws = patient_resamples(np.arange(n), 200, 0)
    expanded = [_brute_c(time[d], event[d], risk[d]) for d in draws]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(expanded, [2.5, 97.5])), abs=1e-12)


def test_cox_partial_likelihood_with_a_tie_by_hand() -> None:
    time, event, risk = [1.0, 2.0, 2.0, 3.0], [1, 1, 1, 0], [0.5, -0.2, 0.1, 0.3]
    e = [math.exp(r) for r in risk]
    # Breslow: the two deaths at t=2 share the risk set {1, 2, 3}; the death at t=1 has everyone at risk
    hand = -((0.5 - math.log(e[0] + e[1] + e[2] + e[3])) + (-0.2 - math.log(e[1] + e[2] + e[3]))
             + (0.1 - math.log(e[1] + e[2] + e[3]))) / 3
    assert sm.cox_partial_nll(time, event, risk) == pytest.approx(hand, abs=1e-12)
    loss = cox_loss(torch.tensor(risk, dtype=torch.float64), torch.tensor(time, dtype=torch.float64),
                    torch.tensor(event, dtype=torch.float64))
    assert float(loss) == pytest.approx(hand, abs=1e-12)
    none = cox_loss(torch.tensor([0.3, 0.1]), torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    assert float(none) == 0.0


def test_kaplan_meier_against_a_hand_worked_table() -> None:
    # t=1: 6 at risk, 1 death -> 5/6; t=2: 5 at risk (the censoring at 2 is still at risk), 1 death -> 4/6;
    # t=3: 3 at risk -> 4/6 * 2/3 = 4/9; t=5: 1 at risk, 1 death -> 0
    km = sm.kaplan_meier([1, 2, 2, 3, 4, 5], [1, 1, 0, 1, 0, 1])
    assert km.times.tolist() == [1, 2, 3, 5]
    assert km.at_risk.tolist() == [6, 5, 3, 1] and km.events.tolist() == [1, 1, 1, 1]
    assert km.survival == pytest.approx([5 / 6, 4 / 6, 4 / 9, 0.0])
    assert km.at([0.5, 2.5, 4.0, 9.0]) == pytest.approx([1.0, 4 / 6, 4 / 9, 0.0])


def test_log_rank_against_a_hand_computed_chi_square() -> None:
    # A: 1 (death), 3 (death), 5 (censored); B: 2, 4, 6 (deaths). Per death time: at risk, A at risk, E_A, V
    # t=1: 6, 3, 1/2, 3*3*1*5/(36*5);  t=2: 5, 2, 2/5, 2*3*1*4/(25*4);  t=3: 4, 2, 1/2, 2*2*1*3/(16*3)
    # t=4: 3, 1, 1/3, 1*2*1*2/(9*2);  t=6: 1, 0, 0, 0
    expected = 0.5 + 0.4 + 0.5 + 1 / 3
    variance = 0.25 + 0.24 + 0.25 + 2 / 9
    chi2 = (2 - expected) ** 2 / variance
    test = sm.logrank([1, 3, 5, 2, 4, 6], [1, 1, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])
    assert test.observed == 2 and test.expected == pytest.approx(expected)
    assert test.chi2 == pytest.approx(chi2) and test.p == pytest.approx(stats.chi2.sf(chi2, 1))
    assert math.isnan(sm.logrank([1, 2], [1, 1], [1, 1]).p)  # one group only


def test_time_dependent_auc_weights_cases_by_the_censoring_distribution() -> None:
    # censorings at 2 and 4: G = 1 before 2, 2/3 from 2 (3 at risk, 1 censored), 0 from 4
    # horizon 3.5: cases 0 (T=1, w 1/G(1) = 1) and 2 (T=3, w 1/G(3) = 3/2); control 3 (T=4, risk 1)
    # case 0 (risk 4) beats the control, case 2 (risk 0.5) does not: (1 * 1 + 1.5 * 0) / (2.5 * 1) = 0.4
    time, event, risk = [1, 2, 3, 4], [1, 0, 1, 0], [4, 3, 0.5, 1]
    auc = sm.cumulative_dynamic_auc(time, event, risk, [3.5, 0.5])
    assert auc[3.5] == pytest.approx(0.4) and math.isnan(auc[0.5])  # no case by 0.5
    tied = sm.cumulative_dynamic_auc(time, event, [1, 3, 1, 2], [1.5])  # controls 3, 1, 2: 0 + 1/2 + 0 over 3
    assert tied[1.5] == pytest.approx(0.5 / 3)


# --- the clinical readers -----------------------------------------------------------------------------------------

GDC_HEADER = "case_id\tcase_submitter_id\tproject_id\tvital_status\tdays_to_death\tdays_to_last_follow_up\n"


def _tsv(tmp_path: Path, rows: list[str], name: str = "clinical.tsv") -> Path:
    path = tmp_path / name
    path.write_text(GDC_HEADER + "".join(r + "\n" for r in rows))
    return path


def test_gdc_overall_survival_takes_the_death_or_the_largest_follow_up(tmp_path) -> None:
    path = _tsv(tmp_path, [
        "u1\tTCGA-AA-0001\tTCGA-LUAD\tDead\t400\t'--",
        "u1\tTCGA-AA-0001\tTCGA-LUAD\tDead\t400\t120",
        "u2\tTCGA-AA-0002\tTCGA-LUAD\tAlive\t'--\t300",
        "u2\tTCGA-AA-0002\tTCGA-LUAD\tAlive\t'--\t900",
        "u3\tTCGA-AA-0003\tTCGA-LUSC\t'--\t'--\t'--",  # no follow-up: left out, counted
        "u4\tTCGA-AA-0004\tTCGA-LUSC\tAlive\t'--\t'--",  # alive, never followed up: left out
    ])
    labels = read_survival(path)
    got = labels.frame.set_index("patient_id")
    assert got.loc["TCGA-AA-0001"].tolist()[:2] == [400.0, 1] and got.loc["TCGA-AA-0002"].tolist()[:2] == [900.0, 0]
    assert labels.no_follow_up == ["TCGA-AA-0003", "TCGA-AA-0004"] and labels.endpoint == "overall_survival"


@pytest.mark.parametrize("rows, message", [
    (["u1\tTCGA-AA-0001\tTCGA-LUAD\tAlive\t'--\t-5"],
     r"clinical.tsv, line 2: patient TCGA-AA-0001: days_to_last_follow_up '-5' is negative"),
    (["u1\tTCGA-AA-0001\tTCGA-LUAD\tDead\t'--\t100"], r"line 2: patient TCGA-AA-0001 is Dead but no row gives days_to_death"),
    (["u1\tTCGA-AA-0001\tTCGA-LUAD\tDead\t100\t'--", "u1\tTCGA-AA-0001\tTCGA-LUAD\tDead\t150\t'--"],
     r"line 3: patient TCGA-AA-0001: days_to_death 150, line 2 gives 100"),
    (["u1\tTCGA-AA-0001\tTCGA-LUAD\tDead\t100\t'--", "u1\tTCGA-AA-0001\tTCGA-LUAD\tAlive\t'--\t20"],
     r"line 3: patient TCGA-AA-0001: vital_status 'Alive', line 2 gives 'Dead'"),
    (["u1\tTCGA-AA-0001\tTCGA-LUAD\tZombie\t'--\t20"], r"line 2: patient TCGA-AA-0001: vital_status 'Zombie'"),
    (["u1\tTCGA-AA-0001\tTCGA-LUAD\tDead\tsoon\t'--"], r"line 2: patient TCGA-AA-0001: days_to_death 'soon' is not a number"),
])
def test_bad_gdc_rows_are_refused_naming_file_line_and_patient(tmp_path, rows, message) -> None:
    with pytest.raises(SurvivalFileError, match=message):
        read_survival(_tsv(tmp_path, rows))


def test_plain_and_named_endpoints(tmp_path) -> None:
    plain = tmp_path / "survival.csv"
    plain.write_text("patient_id,time,event\nP1,10,1\nP1,10,1\nP2,20,0\nP3,,1\n")
    labels = read_survival(plain)
    assert labels.frame[["patient_id", "time", "event"]].values.tolist() == [["P1", 10.0, 1], ["P2", 20.0, 0]]
    assert labels.no_follow_up == ["P3"]
    plain.write_text("patient_id,time,event\nP1,10,1\nP1,12,1\n")
    with pytest.raises(SurvivalFileError, match=r"survival.csv, line 3: patient P1: \(time, event\) = \(12, 1\), line 2"):
        read_survival(plain)
    plain.write_text("patient_id,time,event\nP1,10,2\n")
    with pytest.raises(SurvivalFileError, match=r"line 2: patient P1: event '2' is not an event"):
        read_survival(plain)
    pfi = tmp_path / "pfi.tsv"
    pfi.write_text("case_submitter_id\tvital_status\tPFI.time\tPFI\nA\tAlive\t300\tyes\nB\tDead\t50\tno\n")
    named = read_survival(pfi, "PFI.time", "PFI")
    assert named.frame[["patient_id", "time", "event"]].values.tolist() == [["A", 300.0, 1], ["B", 50.0, 0]]
    assert named.endpoint == "PFI.time/PFI"
    with pytest.raises(SurvivalFileError, match="both a time column and an event column"):
        read_survival(pfi, "PFI.time", None)


# --- the label gate -----------------------------------------------------------------------------------------------


def _tiny_labels(ws, clinical_rows: list[tuple[str, float, int]] | None, **labels) -> None:
    """A matrix every tumour slide of the tiny cohort is labelled by (patient matched normals where present),
    and, beside it, a survival CSV of ``clinical_rows``."""
    from histcode.store.catalog import Catalog

    slides = Catalog.of(ws).slides(status="ok")
    patients = sorted({s["patient_id"] for s in slides})
    normals = {s["patient_id"] for s in slides if "-11Z-" in s["slide_id"]}
    columns = {}
    for i, p in enumerate(patients):
        columns[f"{p}-01A-01R-HC01-07"] = [7.0 if i % 2 else 1.0, 1.0]
        if p in normals:
            columns[f"{p}-11A-01R-HC01-07"] = [3.0, 1.0]
    pd.DataFrame(columns, index=pd.Index(["G1", "G2"], name="gene")).to_csv(ws.root / "expr.tsv", sep="\t")
    if clinical_rows is not None:
        pd.DataFrame(clinical_rows, columns=["patient_id", "time", "event"]).to_csv(ws.root / "surv.csv", index=False)
    params = {"expression": "expr.tsv", "panel": ["G1", "G2"], "min_class_size": 1, "folds": 2, **labels}
    if clinical_rows is not None:
        params["clinical"] = "surv.csv"
    (ws.root / "params.yaml").write_text(yaml.safe_dump({"labels": params}))
    return patients


def test_gate_refuses_survival_alone_with_too_few_events_and_fails_bad_rows(tiled_workspace) -> None:
    from histcode.heads.survival import SurvivalRefused, SurvivalTask
    from histcode.labels.run import frames_dir, gate_labels, ingest_labels, require_passed_gate
    from histcode.store.catalog import Catalog

    ws = tiled_workspace
    patients = _tiny_labels(ws, [])
    patients = _tiny_labels(ws, [(p, 100.0 * (i + 1), i % 2) for i, p in enumerate(patients)] + [("TCGA-ZZ-9999", 5.0, 1)],
                            min_survival_events=3)
    label_set = ingest_labels(ws, ws.config())
    events = sum(i % 2 for i in range(len(patients)))
    assert label_set.n_survival == len(patients) and label_set.n_events == events  # the unknown patient left out
    result = gate_labels(ws, ws.config())
    assert result.passed and set(result.refused) == {"survival"}  # the other tasks still train
    assert f"{events} events among the {len(patients)} labelled patients" in result.refused["survival"]
    catalog = Catalog.of(ws)
    require_passed_gate(catalog)
    with pytest.raises(SurvivalRefused, match="refused by the label gate"):
        SurvivalTask().load(catalog, {s["slide_id"]: None for s in catalog.slides()})

    # enough events: nothing refused, the labels are in the catalog
    (ws.root / "params.yaml").write_text(yaml.safe_dump({"labels": {
        **yaml.safe_load((ws.root / "params.yaml").read_text())["labels"], "min_survival_events": events}}))
    ingest_labels(ws, ws.config())
    assert gate_labels(ws, ws.config()).refused == {}
    stored = catalog.query("SELECT patient_id, time, event FROM survival_labels ORDER BY patient_id")
    assert [r["patient_id"] for r in stored] == patients

    # the gate checks the rows itself, not only the reader: frames edited after ingest fail it, naming the rows
    frame = pd.read_parquet(frames_dir(ws) / "survival.parquet")
    frame.loc[0, "time"], frame.loc[1, "event"] = -3.0, 2
    frame.to_parquet(frames_dir(ws) / "survival.parquet", index=False)
    failed = gate_labels(ws, ws.config(), force=True)
    messages = " | ".join(f.message for f in failed.failures)
    assert not failed.passed and "survival: survival times that are negative: 1 row (" + patients[0] in messages
    assert "survival events other than 0 (censored) or 1 (event): 1 row (" + patients[1] in messages


# --- the demo's simulated follow-up -------------------------------------------------------------------------------


def test_demo_survival_rises_with_tumour_and_reads_back_from_its_clinical_tsv(tmp_path) -> None:
    from histcode.config import DemoConfig
    from histcode.demo.survival import clinical_tsv, simulate_survival

    rng = np.random.default_rng(0)
    n = 400
    slides = pd.DataFrame({"patient_id": [f"TCGA-HC-{i:04d}" for i in range(n)], "sample_type": "tumor",
                           "patient_subtype": rng.choice(["LUAD", "LUSC"], n), "tumour_fraction": rng.uniform(0, 0.7, n)})
    cfg = DemoConfig()
    truth = simulate_survival(slides, cfg, np.random.default_rng(1))
    lo, hi = cfg.survival_follow_up_days
    assert truth.time.max() <= hi and (truth.time[truth.event == 0] >= lo - 1).all()
    assert 0.2 < truth.event.mean() < 0.8  # deaths and censorings both
    assert sm.c_index(truth.time, truth.event, truth.log_hazard) > 0.6  # the simulated hazard orders the deaths
    path = tmp_path / "clinical.tsv"
    clinical_tsv(truth, np.random.default_rng(2)).to_csv(path, sep="\t", index=False)
    read = read_survival(path).frame.set_index("patient_id")
    assert read.time.tolist() == truth.time.astype(float).tolist() and read.event.tolist() == truth.event.tolist()


# --- heads that learn -----------------------------------------------------------------------------------------


def _hazard_bags(n: int = 48, seed: int = 0):
    """Bags whose patients' hazard exp(1.5 x) is carried by feature 0 of half their tiles, with exponential death
    times and uniform censoring: (task data over 3 patient folds, bags, x)."""
    from histcode.heads.data import Bag
    from histcode.heads.tasks import TaskData

    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    time = rng.exponential(1000.0 / np.exp(1.5 * x))
    end = rng.uniform(500, 3000, n)
    event, time = (time <= end).astype(float), np.minimum(time, end).round() + 1
    bags = {}
    for i in range(n):
        tiles = rng.normal(size=(6, 8)).astype(np.float32)
        tiles[:3, 0] += 3.0 * x[i]
        bags[f"s{i}"] = Bag(f"s{i}", f"p{i}", tiles, [f"t{j}" for j in range(6)], np.zeros((6, 2), np.int64), 256)
    data = TaskData("survival", list(bags), np.array([f"p{i}" for i in range(n)]), np.arange(n) % 3,
                    np.stack([time, event], axis=1))
    return data, bags, x


def test_linear_cox_head_learns_the_hazard_out_of_fold() -> None:
    from histcode.heads.cv import cross_validate

    data, bags, x = _hazard_bags()
    oracle = sm.c_index(data.y[:, 0], data.y[:, 1], x)
    result = cross_validate(data, bags, "mean", HeadsConfig(bootstrap=200, device="cpu"))
    pooled = result.pooled
    assert 0.62 < pooled["c_index"] <= oracle + 0.05, pooled
    assert pooled["c_index_ci_low"] <= pooled["c_index"] <= pooled["c_index_ci_high"] and pooled["logrank_p"] < 0.05
    assert len(result.patients) == len(x) and set(result.patients.group) == {"high", "low"}
    assert {"auc_365d", "auc_730d", "auc_1095d"} <= set(pooled)
    assert all(o.shape == (2,) for o in result.outputs.values())  # [log-risk, the fold model's training median]
    # each test patient's call is against its own fold model's training median
    frame = result.patients
    assert ((frame.risk >= frame["median"]) == (frame.group == "high")).all() and frame["median"].nunique() == 3


def test_attention_cox_head_learns_from_mini_batches() -> None:
    from histcode.heads.fit import fit_head
    from histcode.heads.tasks import TASKS

    data, bags, x = _hazard_bags(30, seed=2)
    kind = TASKS["survival"]
    pairs = list(zip([bags[s].features for s in data.slide_ids], kind.targets(data, np.arange(len(x)))))
    cfg = HeadsConfig(device="cpu", survival={"epochs": 6, "min_epochs": 6, "bags_per_step": 10})
    before = sm.c_index(data.y[:, 0], data.y[:, 1], [fit_head(kind, "attention", pairs, [], data.shape,
                        cfg.model_copy(update={"survival": cfg.survival.model_copy(update={"epochs": 1})}), 0)
                        .predict(bags[s].features)[0][0] for s in data.slide_ids])
    head = fit_head(kind, "attention", pairs, [], data.shape, cfg, 0)
    risk = [head.predict(bags[s].features)[0][0] for s in data.slide_ids]
    assert sm.c_index(data.y[:, 0], data.y[:, 1], risk) > max(0.7, before)
    out, attention = head.predict(bags[data.slide_ids[0]].features)
    assert out.shape == (2,) and attention.shape == (6,) and out[1] == pytest.approx(np.median(risk), abs=1e-5)


def test_demo_sized_survival_task_is_trained_registered_stored_and_drawn(headed_workspace) -> None:
    from starlette.testclient import TestClient

    from histcode.store.catalog import Catalog
    from histcode.tracking import Tracker
    from histcode.viewer import create_app

    ws = headed_workspace
    summary = json.loads((ws.metrics_dir / "heads.json").read_text())
    assert not summary["refused"]
    for agg in ("attention", "mean", "best"):
        run = summary["runs"][f"survival/{agg}"]
        assert 0.0 <= run["c_index_ci_low"] <= run["c_index"] <= run["c_index_ci_high"] <= 1.0
        assert 0.0 <= run["logrank_p"] <= 1.0 and run["n_high"] + run["n_low"] == run["n_patients"]
    assert "survival/max" not in summary["runs"] and "survival/guided" not in summary["runs"]
    tracker = Tracker(ws)
    best = tracker.client.get_model_version_by_alias("histcode-survival-head", "best")
    artifacts = {a.path for a in tracker.client.list_artifacts(summary["runs"]["survival/best"]["run_id"])}
    assert {"kaplan_meier.png", "survival_patients.csv", "kaplan_meier.csv"} <= artifacts
    rows = Catalog.of(ws).query("SELECT slide_id, value, call, stale, version FROM predictions "
                                "WHERE task = 'survival' AND source = 'cv'")
    fresh = [r for r in rows if not r["stale"]]
    assert fresh and {r["version"] for r in fresh} == {int(best.version)}
    assert {r["call"] for r in fresh} <= {"high", "low"} and all(math.isfinite(r["value"]) for r in fresh)
    client = TestClient(create_app(ws), base_url="http://127.0.0.1")  # a host the viewer answers for
    assert "survival-km" in client.get("/").text
    picture = client.get("/api/survival-km.png")
    assert picture.status_code == 200 and picture.content[:8] == b"\x89PNG\r\n\x1a\n"
