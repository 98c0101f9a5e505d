"""Expression labels and the Great Expectations gate: a good matrix passes with hand-computed fold changes;
every kind of bad input fails with its own message, and nothing may train from a failed label set."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from histcode.labels.barcodes import parse_barcode
from histcode.labels.run import LabelGateError, gate_labels, ingest_labels, require_passed_gate
from histcode.store.catalog import Catalog

GENES = ("G1", "G2", "G3")
LABELS = {"panel": list(GENES), "min_class_size": 1, "folds": 2}


def _patients(ws) -> tuple[list[str], list[str]]:
    """(patients with a normal slide, patients without) in the tiny cohort."""
    slides = Catalog.of(ws).slides(status="ok")
    patients = sorted({s["patient_id"] for s in slides})
    normals = {s["patient_id"] for s in slides if "-11Z-" in s["slide_id"]}
    return [p for p in patients if p in normals], [p for p in patients if p not in normals]


def _good_matrix(ws) -> pd.DataFrame:
    """Tumour/normal values chosen so every fold change is a round number."""
    with_normal, without = _patients(ws)
    columns = {}
    for i, p in enumerate(with_normal):
        columns[f"{p}-11A-01R-HC01-07"] = [3.0, 7.0, 1.0]  # normal
        up = i % 2 == 0
        columns[f"{p}-01A-01R-HC01-07"] = [7.0 if up else 1.0, 1.0, 1.0]  # G1: log2(8/4)=1 or log2(2/4)=-1
    for p in without:
        columns[f"{p}-01A-01R-HC01-07"] = [11.0, 3.0, 1.0]
    return pd.DataFrame(columns, index=pd.Index(GENES, name="gene"))


def _write(ws, frame: pd.DataFrame, name: str = "expr.tsv", **labels) -> None:
    path = ws.root / name
    frame.to_csv(path, sep="\t")
    (ws.root / "params.yaml").write_text(yaml.safe_dump({"labels": {**LABELS, "expression": name, **labels}}))


def _run(ws):
    cfg = ws.config()
    label_set = ingest_labels(ws, cfg)
    return label_set, gate_labels(ws, cfg)


def test_barcode_rules() -> None:
    assert parse_barcode("TCGA-05-4244-01A-01R-1107-07").kind == "tumor"
    assert parse_barcode("TCGA-05-4244-11A-01R-1107-07").kind == "normal"
    assert parse_barcode("TCGA-05-4244-20A").kind == "control"
    assert parse_barcode("TCGA-05-4244-01Z-00-DX1").patient_id == "TCGA-05-4244"
    assert parse_barcode("sample-7") is None


def test_good_matrix_passes_with_hand_computed_fold_changes(tiled_workspace) -> None:
    ws = tiled_workspace
    _write(ws, _good_matrix(ws))
    label_set, gate = _run(ws)
    assert gate.passed, gate.summary()
    de = pd.DataFrame(Catalog.of(ws).query("SELECT * FROM de_labels"))
    with_normal, without = _patients(ws)
    for i, p in enumerate(with_normal):
        rows = de[de.patient_id == p].set_index("gene")
        assert rows.loc["G1", "log2fc"] == pytest.approx(1.0 if i % 2 == 0 else -1.0)  # log2(8/4), log2(2/4)
        assert rows.loc["G2", "log2fc"] == pytest.approx(math.log2(2 / 8))  # = -2: down
        assert rows.loc["G3", "log2fc"] == pytest.approx(0.0)
        assert set(rows.reference) == {"matched_normal"}
        assert rows.loc["G2", "de_class"] == "down" and rows.loc["G3", "de_class"] == "unchanged"
    for p in without:  # against the cohort's normal mean (G1: every normal is 3): log2((11 + 1) / (3 + 1))
        rows = de[de.patient_id == p].set_index("gene")
        assert rows.loc["G1", "log2fc"] == pytest.approx(math.log2(12 / 4)) and rows.loc["G1", "reference"] == "cohort_normal_mean"
        assert rows.loc["G2", "log2fc"] == pytest.approx(math.log2(4 / 8))
    assert label_set.excluded_genes["G3"].startswith("a single class (unchanged)")
    assert "G3" in gate.excluded_genes and gate.docs is not None and gate.docs.is_file()
    assert "Expectation" in gate.docs.read_text()
    current = require_passed_gate(Catalog.of(ws))
    assert current["gate_status"] == "passed"
    slides = pd.DataFrame(Catalog.of(ws).query("SELECT * FROM slide_labels"))
    assert slides.tumor.sum() == len(with_normal) + len(without) and set(slides.subtype.dropna()) <= {"LUAD", "LUSC"}
    folds = pd.DataFrame(Catalog.of(ws).query("SELECT * FROM cv_folds"))
    assert folds.groupby("patient_id").fold.nunique().max() == 1 and set(folds.fold) == {0, 1}


def _corrupt(ws, how: str) -> dict:
    frame = _good_matrix(ws)
    first = frame.columns[0]
    extra = {}
    if how == "nan":
        frame.loc["G2", first] = float("nan")
    elif how == "negative":
        frame.loc["G2", first] = -5.0
    elif how == "infinite":
        frame.loc["G2", first] = float("inf")
    elif how == "duplicate":
        frame = pd.concat([frame, frame.loc[["G1"]]])
    elif how == "unknown":
        frame["TCGA-ZZ-9999-01A-01R-HC01-07"] = 1.0
    elif how == "wrong_type":
        frame = frame.astype(object)
        frame.loc["G2", first] = "high"
    elif how == "small_class":
        extra = {"min_class_size": 3}
    return {"frame": frame, **extra}


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("nan", "missing values (empty, NA or NaN cells): 1 row"),
        ("negative", "values that are negative, infinite or above 1e+09: 1 row"),
        ("infinite", "values that are negative, infinite or above 1e+09: 1 row"),
        ("duplicate", "duplicate (sample, gene) rows"),
        ("unknown", "samples that map to no registered, tiled slide or patient: 1 row (TCGA-ZZ-9999-01A-01R-HC01-07)"),
        ("wrong_type", "cells that are not numbers (wrong type): 1 row"),
        ("small_class", "slide classes with fewer than 3 slides"),
    ],
)
def test_each_bad_input_fails_the_gate_with_its_own_message(tiled_workspace, how: str, expected: str) -> None:
    ws = tiled_workspace
    spec = _corrupt(ws, how)
    frame = spec.pop("frame")
    _write(ws, frame, **spec)
    _, gate = _run(ws)
    assert not gate.passed
    messages = [f.message for f in gate.failures]
    assert any(expected in m for m in messages), messages
    if how in ("nan", "negative", "infinite", "wrong_type"):  # the offending cell is named
        first = frame.columns[0]
        assert any(f"{first} / G2" in m for m in messages), messages
    with pytest.raises(LabelGateError, match="failed the gate; nothing trains"):
        require_passed_gate(Catalog.of(ws))


def test_empty_file_is_refused_at_ingest(tiled_workspace) -> None:
    """(Issue 32: refused when read, not accepted as the current label set for the gate to refuse later; the
    header-only case is in tests/test_stores_agree.py.)"""
    from histcode.labels.expression import ExpressionFileError

    ws = tiled_workspace
    (ws.root / "empty.tsv").write_bytes(b"")
    (ws.root / "params.yaml").write_text(yaml.safe_dump({"labels": {**LABELS, "expression": "empty.tsv"}}))
    with pytest.raises(ExpressionFileError, match="empty.tsv: the expression file is empty"):
        _run(ws)
    assert Catalog.of(ws).query("SELECT * FROM label_sets") == []
    with pytest.raises(LabelGateError):
        require_passed_gate(Catalog.of(ws))


def test_unchanged_labels_are_kept_with_their_verdict_and_a_change_redoes_them(tiled_workspace) -> None:
    """Ingest and gate on unchanged inputs do no work (the label set row, its frames and its verdict stay as
    they are), so the demo, the flow and `dvc repro` after one another agree; --force, a changed matrix or
    changed gate settings do the work again."""
    ws = tiled_workspace
    _write(ws, _good_matrix(ws))
    first, gate = _run(ws)
    assert gate.passed and not first.reused
    row = lambda: Catalog.of(ws).query("SELECT label_version, created_at, gate_at, gate_status FROM label_sets")  # noqa: E731
    before = row()
    frames = {f.name: f.stat().st_mtime_ns for f in first.frames_dir.glob("*.parquet")}
    again, regate = _run(ws)
    assert again.reused and again.label_version == first.label_version and regate.passed
    assert (again.n_samples, again.n_genes, again.de_counts, again.excluded_genes) == \
        (first.n_samples, first.n_genes, first.de_counts, first.excluded_genes)
    assert row() == before and {f.name: f.stat().st_mtime_ns for f in again.frames_dir.glob("*.parquet")} == frames
    assert regate.docs == gate.docs and regate.excluded_genes == gate.excluded_genes
    assert gate_labels(ws, ws.config(), force=True).passed and row()[0]["gate_at"] > before[0]["gate_at"]
    forced = ingest_labels(ws, ws.config(), force=True)
    assert not forced.reused and row()[0]["gate_status"] == "pending"
    assert gate_labels(ws, ws.config()).passed
    _write(ws, _good_matrix(ws), min_class_size=50)  # other settings: another label set, judged anew
    changed, verdict = _run(ws)
    assert not changed.reused and changed.label_version != first.label_version and not verdict.passed


def test_no_labels_or_no_gate_means_nothing_trains(tiled_workspace) -> None:
    ws = tiled_workspace
    with pytest.raises(LabelGateError, match="no labels"):
        require_passed_gate(Catalog.of(ws))
    _write(ws, _good_matrix(ws))
    ingest_labels(ws, ws.config())
    with pytest.raises(LabelGateError, match="has not been through the gate"):
        require_passed_gate(Catalog.of(ws))


def test_sample_sheet_maps_non_tcga_samples(tiled_workspace) -> None:
    ws = tiled_workspace
    frame = _good_matrix(ws)
    names = {c: f"S{i}" for i, c in enumerate(frame.columns)}
    sheet = pd.DataFrame({"sample_id": list(names.values()),
                          "patient_id": [c[:12] for c in names],
                          "sample_type": ["normal" if "-11A-" in c else "tumor" for c in names]})
    sheet.to_csv(ws.root / "sheet.csv", index=False)
    _write(ws, frame.rename(columns=names), sample_sheet="sheet.csv")
    _, gate = _run(ws)
    assert gate.passed, gate.summary()
    mapped = Catalog.of(ws).query("SELECT DISTINCT mapped_by FROM expression_samples")
    assert mapped == [{"mapped_by": "sample_sheet"}]


def test_frames_of_a_failed_ingest_are_never_judged_for_the_current_label_set(tiled_workspace, monkeypatch) -> None:
    """The frames are swapped in before the catalog's transaction; if that transaction fails, the gate refuses
    frames of another label set instead of recording their verdict on the current one, and the next ingest
    repairs it."""
    from histcode.labels.run import current_label_set

    ws = tiled_workspace
    frame = _good_matrix(ws)
    _write(ws, frame)
    first, gate = _run(ws)
    assert gate.passed
    _write(ws, frame * 2.0)  # another matrix: another label set

    real = Catalog.replace_table

    def failing(self, con, table, frame):
        if table == "de_labels":
            raise RuntimeError("disk full")
        return real(self, con, table, frame)

    monkeypatch.setattr(Catalog, "replace_table", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        ingest_labels(ws, ws.config())
    monkeypatch.undo()
    assert current_label_set(Catalog.of(ws))["label_version"] == first.label_version  # the catalog rolled back
    with pytest.raises(LabelGateError, match=f"are of label set ls-[0-9a-f]+, not of the current {first.label_version}"):
        gate_labels(ws, ws.config(), force=True)
    second, gate = _run(ws)
    assert second.label_version != first.label_version and not second.reused and gate.passed
