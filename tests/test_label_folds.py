"""Folds by tissue-source site (``labels.folds_by``) and control genes from the cohort's gene table
(``labels.control_genes``, ``labels.gene_table``), resolved at label ingest and kept with the label set."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from histcode.config import LabelsConfig, stable_hash
from histcode.labels.de import FoldPlanError, plan_folds, slide_labels, slide_sites
from histcode.labels.genes import GeneTableError, gene_table_path, resolve_control_genes
from histcode.labels.run import current_label_set, ingest_labels
from histcode.store.catalog import Catalog
from histcode.tiling.spec import spec_id_of
from tests.test_labels import GENES, _good_matrix, _write

TSS = re.compile(r"^TCGA-(\w{2})-")  # the test's own reading of a barcode's site, not the code's


def _cohort(n_sites: int, per_site: int) -> list[dict]:
    """Catalog-like slide rows: ``per_site`` patients at each of ``n_sites`` TCGA sites, a tumour slide each (both
    subtypes at every site) and a normal slide for every other patient."""
    slides = []
    for s in range(n_sites):
        site = f"{chr(65 + s)}{s}"
        for p in range(per_site):
            patient = f"TCGA-{site}-{s * 100 + p:04d}"
            subtype = "LUAD" if p % 2 else "LUSC"
            slides.append({"slide_id": f"{patient}-01Z-00-DX1", "patient_id": patient,
                           "attributes": json.dumps({"subtype": subtype})})
            if p % 2 == 0:
                slides.append({"slide_id": f"{patient}-11Z-00-DX1", "patient_id": patient, "attributes": None})
    return slides


def _plan(slides: list[dict], folds: int, folds_by: str, seed: int = 0):
    return plan_folds(slide_labels(slides), folds, seed, folds_by, slide_sites(slides))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_site_folds_keep_every_site_in_one_fold(seed: int) -> None:
    slides = _cohort(n_sites=9, per_site=4)
    folds, choice = _plan(slides, 3, "site", seed)
    assert choice.by == "site" and "9 sites for 3 folds" in choice.reason
    assert len(folds) == len(slides) and set(folds.fold) == {0, 1, 2}
    site = folds.slide_id.str.extract(TSS)[0]
    assert site.notna().all()
    assert (folds.groupby(site).fold.nunique() == 1).all()  # every slide, so every patient, of a site: one fold
    assert (folds.groupby("patient_id").fold.nunique() == 1).all()
    # patient folds of the same cohort do split sites: the site grouping is what keeps them whole
    by_patient, _ = _plan(slides, 3, "patient", seed)
    assert (by_patient.groupby(by_patient.slide_id.str.extract(TSS)[0]).fold.nunique() > 1).any()


def test_auto_picks_site_for_tcga_barcodes_with_enough_sites_and_patient_otherwise() -> None:
    folds, choice = _plan(_cohort(n_sites=6, per_site=3), 5, "auto")
    assert choice.by == "site"
    assert choice.reason == ("labels.folds_by = auto: site folds, as every labelled slide has a site and there are 6 "
                             "sites for 5 folds")
    assert (folds.groupby(folds.slide_id.str.extract(TSS)[0]).fold.nunique() == 1).all()

    folds, choice = _plan(_cohort(n_sites=3, per_site=4), 5, "auto")
    assert choice.by == "patient" and "3 sites (A0, B1, C2) for 5 folds" in choice.reason
    assert set(folds.fold) == set(range(5)) and (folds.groupby("patient_id").fold.nunique() == 1).all()

    unsited = _cohort(n_sites=6, per_site=3) + [{"slide_id": "slide-x", "patient_id": "px",
                                                  "attributes": json.dumps({"sample_type": "tumor"})}]
    _, choice = _plan(unsited, 5, "auto")
    assert choice.by == "patient" and "1 of 31 labelled slides have no site" in choice.reason
    assert "slide-x" in choice.reason
    _, choice = _plan(_cohort(n_sites=6, per_site=3), 5, "patient")
    assert (choice.by, choice.reason) == ("patient", "labels.folds_by = patient")


def test_site_errors_name_the_count_and_the_slides() -> None:
    with pytest.raises(FoldPlanError, match=r"labels.folds_by = site: 3 sites \(A0, B1, C2\) for 5 folds"):
        _plan(_cohort(n_sites=3, per_site=4), 5, "site")
    unsited = _cohort(n_sites=6, per_site=3) + [{"slide_id": "slide-x", "patient_id": "px",
                                                  "attributes": json.dumps({"sample_type": "tumor"})}]
    with pytest.raises(FoldPlanError, match=r"1 of 31 labelled slides have no site .*: slide-x"):
        _plan(unsited, 5, "site")


def test_a_site_attribute_is_the_site_and_a_patient_across_sites_is_refused() -> None:
    slides = [{"slide_id": f"s{i}", "patient_id": f"p{i}",
               "attributes": json.dumps({"site": f"lab{i % 4}", "sample_type": "tumor" if i % 3 else "normal"})}
              for i in range(16)]
    assert slide_sites(slides)["s5"] == "lab1"
    folds, choice = _plan(slides, 4, "auto")
    assert choice.by == "site"
    site = {s["slide_id"]: json.loads(s["attributes"])["site"] for s in slides}
    assert (folds.groupby(folds.slide_id.map(site)).fold.nunique() == 1).all() and set(folds.fold) == set(range(4))
    split = slides + [{"slide_id": "s0b", "patient_id": "p0", "attributes": json.dumps({"site": "lab3",
                                                                                        "sample_type": "tumor"})}]
    with pytest.raises(FoldPlanError, match="patients with slides of more than one site .*: p0"):
        _plan(split, 4, "site")
    assert _plan(split, 4, "auto")[1].by == "patient"


def _params(ws) -> dict:
    return json.loads(current_label_set(Catalog.of(ws))["params"])


def test_ingest_records_the_fold_choice_and_a_change_replans(tiled_workspace) -> None:
    """The tiny demo cohort: four patients at four sites (its manifest's ``site`` column and the TCGA barcodes)."""
    ws = tiled_workspace
    slides = Catalog.of(ws).tiled_slides(spec_id_of(ws.config().tiling))
    assert slide_sites(slides) == {s["slide_id"]: TSS.match(s["slide_id"])[1] for s in slides}
    _write(ws, _good_matrix(ws))  # folds: 2, folds_by auto
    first = ingest_labels(ws, ws.config())
    params = _params(ws)
    assert first.folds_by == params["folds_by_resolved"] == "site"
    assert first.folds_reason == params["folds_by_reason"] == (
        "labels.folds_by = auto: site folds, as every labelled slide has a site and there are 4 sites for 2 folds")
    folds = pd.DataFrame(Catalog.of(ws).query("SELECT * FROM cv_folds"))
    assert (folds.groupby(folds.slide_id.str.extract(TSS)[0]).fold.nunique() == 1).all()
    assert ingest_labels(ws, ws.config()).reused and ingest_labels(ws, ws.config()).folds_by == "site"

    _write(ws, _good_matrix(ws), folds_by="patient")
    replanned = ingest_labels(ws, ws.config())
    assert not replanned.reused and replanned.label_version != first.label_version
    assert (_params(ws)["folds_by_resolved"], _params(ws)["folds_by"]) == ("patient", "patient")

    _write(ws, _good_matrix(ws), folds=5)
    assert ingest_labels(ws, ws.config()).folds_by == "patient"
    assert "4 sites (HC, HK, HM, HR) for 5 folds" in _params(ws)["folds_by_reason"]
    _write(ws, _good_matrix(ws), folds=5, folds_by="site")
    version = current_label_set(Catalog.of(ws))["label_version"]
    with pytest.raises(FoldPlanError, match=r"4 sites \(HC, HK, HM, HR\) for 5 folds"):
        ingest_labels(ws, ws.config())
    assert current_label_set(Catalog.of(ws))["label_version"] == version  # nothing written


def _genes_csv(ws, name: str = "genes.csv", **columns) -> None:
    pd.DataFrame({"gene": [*GENES, "OTHER"], **columns}).to_csv(ws.root / name, index=False)


def _controls(ws) -> tuple[str, ...]:
    from histcode.heads.tasks import label_params

    return label_params(Catalog.of(ws)).control_genes


def test_control_genes_from_the_gene_table_beside_the_matrix(tiled_workspace) -> None:
    ws = tiled_workspace
    _write(ws, _good_matrix(ws))
    first = ingest_labels(ws, ws.config())
    assert first.control_genes == () and _controls(ws) == () and _params(ws)["control_genes_source"] == "none"

    _genes_csv(ws, control=["false", "true", "True", "true"])  # OTHER is a control, but not in the panel
    label_set = ingest_labels(ws, ws.config())
    assert not label_set.reused and label_set.label_version != first.label_version  # a new table: a new label set
    assert label_set.control_genes == _controls(ws) == ("G2", "G3")
    assert _params(ws)["control_genes_source"] == str(ws.root / "genes.csv")

    _genes_csv(ws, morphological_signal=[True, True, False, False])  # control = no signal, as the demo writes it
    assert ingest_labels(ws, ws.config()).control_genes == _controls(ws) == ("G3",)

    _write(ws, _good_matrix(ws), control_genes=["G1"])  # explicit wins over the table
    assert ingest_labels(ws, ws.config()).control_genes == _controls(ws) == ("G1",)
    _write(ws, _good_matrix(ws), control_genes=[])  # () = none, table or not
    assert ingest_labels(ws, ws.config()).control_genes == _controls(ws) == ()
    assert _params(ws)["control_genes_source"] == "labels.control_genes"


def test_a_named_gene_table_is_read_and_a_table_without_the_columns_is_refused(tiled_workspace) -> None:
    ws = tiled_workspace
    (ws.root / "tables").mkdir()
    _genes_csv(ws, "tables/mine.csv", control=["true", "false", "false", "false"])
    _write(ws, _good_matrix(ws), gene_table="tables/mine.csv")
    assert ingest_labels(ws, ws.config()).control_genes == _controls(ws) == ("G1",)

    _genes_csv(ws, role=["driver"] * 4)  # genes.csv beside the matrix, with neither column
    _write(ws, _good_matrix(ws))
    with pytest.raises(GeneTableError, match=re.escape(str(ws.root / "genes.csv")) +
                       ": gene table has neither a 'control' nor a 'morphological_signal' column"):
        ingest_labels(ws, ws.config())
    _write(ws, _good_matrix(ws), gene_table="tables/absent.csv")
    with pytest.raises(GeneTableError, match=r"absent.csv: gene table \(labels.gene_table\) not found"):
        ingest_labels(ws, ws.config())


def test_gene_table_resolution(tmp_path) -> None:
    matrix = tmp_path / "expr.tsv"
    assert gene_table_path(None, matrix) is None
    cfg = LabelsConfig(panel=("A", "B", "C"))
    assert resolve_control_genes(cfg, None).genes == ()
    table = tmp_path / "genes.csv"
    table.write_text("gene,control,morphological_signal\nA,yes,false\nB,no,false\nC,0,true\n")
    assert gene_table_path(None, matrix) == table
    controls = resolve_control_genes(cfg, table)  # control wins over morphological_signal
    assert controls.genes == ("A",) and controls.source == str(table) and controls.digest() is not None
    assert resolve_control_genes(cfg.model_copy(update={"control_genes": ("C",)}), table).genes == ("C",)
    table.write_text("gene,control\nA,maybe\nB,true\n")
    with pytest.raises(GeneTableError, match=r"genes.csv: column 'control' must be true or false, not \(A: 'maybe'\)"):
        resolve_control_genes(cfg, table)
    table.write_text("name,control\nA,true\n")
    with pytest.raises(GeneTableError, match=r"genes.csv: gene table has no 'gene' column"):
        resolve_control_genes(cfg, table)
    assert stable_hash(cfg.model_dump(mode="json")) != stable_hash(
        cfg.model_copy(update={"folds_by": "site"}).model_dump(mode="json"))  # folds_by is part of the label version
