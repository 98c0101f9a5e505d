"""GDC downloads as gdc-client writes them: STAR gene counts, sample sheets, clinical TSVs and slides named by
barcode, written here in GDC's exact formats. A GDC download ingests into the same labels as the matrix form of the
same numbers; the clinical subtype reaches the slide labels; every malformed input is refused with its file, line
and reason and nothing written; the CLI runs end to end on the tiny cohort."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from histcode.cli import app
from histcode.ingest.gdc import gdc_slide_sources, read_gdc_sheet
from histcode.ingest.sources import ManifestError
from histcode.labels.expression import ExpressionFileError
from histcode.labels.gdc import GdcDownload, read_gdc_clinical, read_gdc_expression
from histcode.labels.run import current_label_set, frames_dir, gate_labels, ingest_labels
from histcode.store.catalog import Catalog
from histcode.tiling.spec import spec_id_of
from tests.test_labels import GENES, LABELS, _good_matrix

STAR_HEADER = ("gene_id\tgene_name\tgene_type\tunstranded\tstranded_first\tstranded_second\ttpm_unstranded\t"
               "fpkm_unstranded\tfpkm_uq_unstranded")
SHEET_HEADER = ("File ID", "File Name", "Data Category", "Data Type", "Project ID", "Case ID", "Sample ID", "Sample Type")
SAMPLE_TYPE = {"01": "Primary Tumor", "11": "Solid Tissue Normal", "10": "Blood Derived Normal"}
runner = CliRunner()


def _uuid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def _matrix(ws) -> pd.DataFrame:
    """test_labels' matrix of round fold changes, its samples named as GDC names them (TCGA-HC-0001-01A), with a
    fourth gene outside the panel."""
    matrix = _good_matrix(ws)
    matrix.columns = [c[:16] for c in matrix.columns]
    return pd.concat([matrix, pd.DataFrame([[50.0 + i for i in range(matrix.shape[1])]], columns=matrix.columns,
                                           index=pd.Index(["OTHER"], name="gene"))])


def _star_rows(values: list[float], model_extra: bool = True) -> list[str]:
    """A STAR augmented gene counts body: summary rows, one row per gene with ``values`` as tpm_unstranded, plus a
    _PAR_Y copy of G1 and a second, lower locus of G2 that the duplicate rule must drop."""
    rows = ["N_unmapped\t\t\t1200\t1200\t1200\t\t\t", "N_multimapping\t\t\t800\t800\t800\t\t\t",
            "N_noFeature\t\t\t300\t9000\t9100\t\t\t", "N_ambiguous\t\t\t150\t40\t45\t\t\t"]
    for i, (name, tpm) in enumerate(zip([*GENES, "OTHER"], values), start=1):
        count = int(tpm * 100)
        rows.append(f"ENSG0000000000{i}.1{i}\t{name}\tprotein_coding\t{count}\t{count // 2}\t{count - count // 2}\t"
                    f"{tpm}\t{tpm / 2}\t{tpm / 3}")
        if model_extra and name == "G1":
            rows.append(f"ENSG0000000000{i}.1{i}_PAR_Y\t{name}\tprotein_coding\t0\t0\t0\t0.0\t0.0\t0.0")
        if model_extra and name == "G2":  # a readthrough row of the same symbol, always lower
            rows.append(f"ENSG00000099999.2\t{name}\tprotein_coding\t5\t2\t3\t0.05\t0.02\t0.03")
    return rows


def write_star(path: Path, values: list[float], model: str = "GENCODE v36", header: str = STAR_HEADER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([f"# gene-model: {model}", header, *_star_rows(values)]) + "\n")


def write_sheet(path: Path, rows: list[dict]) -> None:
    lines = ["\t".join(SHEET_HEADER)] + ["\t".join(r.get(c, "") for c in SHEET_HEADER) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def write_download(root: Path, matrix: pd.DataFrame, project: str = "TCGA-LUAD") -> tuple[Path, Path, list[dict]]:
    """The matrix as a GDC download: DIR/<uuid>/<uuid>.rna_seq.augmented_star_gene_counts.tsv and its sample
    sheet. Returns (sheet, DIR, sheet rows)."""
    rows = []
    for sample in matrix.columns:
        fid = _uuid(sample)
        name = f"{_uuid(sample + 'file')}.rna_seq.augmented_star_gene_counts.tsv"
        write_star(root / "rna" / fid / name, matrix[sample].tolist())
        rows.append({"File ID": fid, "File Name": name, "Data Category": "Transcriptome Profiling",
                     "Data Type": "Gene Expression Quantification", "Project ID": project, "Case ID": sample[:12],
                     "Sample ID": sample, "Sample Type": SAMPLE_TYPE[sample[13:15]]})
    sheet = root / "gdc_sample_sheet.2026-01-01.tsv"
    write_sheet(sheet, rows)
    return sheet, root / "rna", rows


def _params(ws, **labels) -> None:
    (ws.root / "params.yaml").write_text(yaml.safe_dump({"labels": {**LABELS, **labels}}))


def _tables(ws) -> dict[str, pd.DataFrame]:
    catalog = Catalog.of(ws)
    out = {}
    for table, key in (("de_labels", ["sample_id", "gene"]), ("slide_labels", ["slide_id"]), ("gene_gate", ["gene"]),
                       ("cv_folds", ["slide_id"]), ("expression", ["sample_id", "gene"]),
                       ("expression_samples", ["sample_id"])):
        frame = pd.DataFrame(catalog.query(f"SELECT * FROM {table}"))
        out[table] = frame.drop(columns=["mapped_by"], errors="ignore").sort_values(key).reset_index(drop=True)
    return out


# --- expression -------------------------------------------------------------------------------------------------


def test_gdc_download_gives_the_labels_of_the_matrix_form(tiled_workspace, tmp_path) -> None:
    """Done when: the same numbers as a matrix and as a GDC download give equal label tables."""
    ws = tiled_workspace
    matrix = _matrix(ws)
    matrix.to_csv(ws.root / "expr.tsv", sep="\t")
    _params(ws, expression="expr.tsv")
    from_matrix = ingest_labels(ws, ws.config())
    assert gate_labels(ws, ws.config()).passed
    expected = _tables(ws)
    sheet, root, _ = write_download(tmp_path / "gdc", matrix)
    from_gdc = ingest_labels(ws, ws.config(), gdc=GdcDownload(sheet, root))
    assert from_gdc.label_version != from_matrix.label_version and not from_gdc.reused
    got = _tables(ws)
    for name, frame in expected.items():
        pd.testing.assert_frame_equal(got[name], frame, check_like=True, obj=name)
    assert len(got["de_labels"]) == 3 * len(matrix.columns[matrix.columns.str.endswith("-01A")])
    # the duplicate rule left G1's value (not its zero _PAR_Y copy) and G2's higher locus (not 0.05)
    expression = got["expression"].set_index(["sample_id", "gene"]).value
    first = matrix.columns[0]
    assert expression[(first, "G1")] == matrix.loc["G1", first] and expression[(first, "G2")] == matrix.loc["G2", first]
    assert gate_labels(ws, ws.config()).passed
    assert ingest_labels(ws, ws.config(), gdc=GdcDownload(sheet, root)).reused  # same download: nothing to do
    current = current_label_set(Catalog.of(ws))
    assert json.loads(current["params"])["gdc_unit"] == "tpm_unstranded" and current["unit"] == "TPM"


def test_units_gene_keys_and_the_duplicate_rule(tmp_path) -> None:
    matrix = pd.DataFrame({"TCGA-AA-0001-01A": [8.0, 2.0, 1.0, 4.0], "TCGA-AA-0001-11A": [1.0, 2.0, 3.0, 4.0]},
                          index=pd.Index([*GENES, "OTHER"], name="gene"))
    sheet, root, _ = write_download(tmp_path, matrix)
    by_symbol = read_gdc_expression(GdcDownload(sheet, root))
    assert by_symbol.gene_model == "GENCODE v36" and by_symbol.dropped_duplicates == 2  # one _PAR_Y, one G2 locus
    values = by_symbol.long.set_index(["sample_id", "gene"]).value
    assert values[("TCGA-AA-0001-01A", "G1")] == 8.0 and values[("TCGA-AA-0001-01A", "G2")] == 2.0
    assert sorted(by_symbol.long.gene.unique()) == ["G1", "G2", "G3", "OTHER"]
    counts = read_gdc_expression(GdcDownload(sheet, root, unit="unstranded")).long.set_index(["sample_id", "gene"]).value
    assert counts[("TCGA-AA-0001-01A", "G1")] == 800 and counts[("TCGA-AA-0001-11A", "G3")] == 300
    fpkm = read_gdc_expression(GdcDownload(sheet, root, unit="fpkm_unstranded")).long.set_index(["sample_id", "gene"]).value
    assert fpkm[("TCGA-AA-0001-01A", "G1")] == 4.0
    by_id = read_gdc_expression(GdcDownload(sheet, root, genes="ensembl"))
    # Ensembl ids without version; the _PAR_Y copy dropped; the second G2 locus is another gene by id
    assert sorted(by_id.long.gene.unique()) == ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003",
                                                "ENSG00000000004", "ENSG00000099999"]
    assert by_id.dropped_duplicates == 1
    samples = by_symbol.sheet.set_index("sample_id")
    assert samples.loc["TCGA-AA-0001-11A", "sample_type"] == "normal" and samples.loc["TCGA-AA-0001-11A", "type_code"] == "11"
    assert samples.loc["TCGA-AA-0001-01A", "patient_id"] == "TCGA-AA-0001"


def test_ties_in_the_duplicate_rule_keep_the_lowest_gene_id(tmp_path) -> None:
    from histcode.labels.gdc import collapse_duplicates

    table = pd.DataFrame({"gene_id": ["ENSG2.1", "ENSG1.1", "ENSG3.1_PAR_Y", "ENSG4.1"],
                          "gene_name": ["X", "X", "Y", "Y"], "S1": ["5", "5", "9", "1"], "S2": ["1", "1", "9", "2"]})
    wide, dropped = collapse_duplicates(table, "symbol")
    assert dropped == 2 and wide.gene.tolist() == ["X", "Y"]
    assert wide.S1.tolist() == ["5", "1"]  # X: the tie goes to ENSG1; Y: the PAR_Y row is gone despite its 9


def test_clinical_subtype_reaches_the_slide_labels(tiled_workspace, tmp_path) -> None:
    ws = tiled_workspace
    _params(ws)
    matrix = _matrix(ws)
    sheet, root, _ = write_download(tmp_path / "gdc", matrix)
    slides = Catalog.of(ws).slides(status="ok")
    attribute = {s["patient_id"]: json.loads(s["attributes"]).get("subtype") for s in slides
                 if json.loads(s["attributes"]).get("subtype")}
    patients = sorted(attribute)
    flipped = {p: "LUSC" if attribute[p] == "LUAD" else "LUAD" for p in patients[:-1]}  # the last one: '-- only
    lines = ["case_id\tcase_submitter_id\tproject_id\tage_at_index\tprimary_diagnosis"]
    for p, subtype in flipped.items():
        for diagnosis in ("Adenocarcinoma, NOS", "'--"):  # one row per diagnosis, as GDC exports them
            lines.append(f"{_uuid(p)}\t{p}\tTCGA-{subtype}\t61\t{diagnosis}")
    lines.append(f"{_uuid(patients[-1])}\t{patients[-1]}\t'--\t'--\t'--")
    clinical = tmp_path / "clinical.tsv"
    clinical.write_text("\n".join(lines) + "\n")
    assert read_gdc_clinical(clinical) == flipped
    assert read_gdc_clinical(clinical, "primary_diagnosis") == {p: "Adenocarcinoma, NOS" for p in flipped}
    ingest_labels(ws, ws.config(), gdc=GdcDownload(sheet, root, clinical))
    labels = pd.DataFrame(Catalog.of(ws).query("SELECT * FROM slide_labels WHERE tumor"))
    by_patient = labels.groupby("patient_id").subtype.agg(set).to_dict()
    for p in patients[:-1]:
        assert by_patient[p] == {flipped[p]}  # the clinical subtype, not the slide attribute
    assert by_patient[patients[-1]] == {attribute[patients[-1]]}  # no clinical subtype: the attribute stays
    conflicting = tmp_path / "conflict.tsv"
    conflicting.write_text(lines[0] + f"\n{_uuid('a')}\tTCGA-AA-0001\tTCGA-LUAD\t1\tx\n{_uuid('a')}\tTCGA-AA-0001\tTCGA-LUSC\t1\tx\n")
    with pytest.raises(ExpressionFileError, match=r"conflict.tsv, line 3: patient TCGA-AA-0001 has project_id 'TCGA-LUSC', line 2 gives 'LUAD'"):
        read_gdc_clinical(conflicting)
    with pytest.raises(ExpressionFileError, match=r"lacks the column\(s\) \['subtype'\]"):
        read_gdc_clinical(clinical, "subtype")


def _break(tmp_path: Path, how: str, matrix: pd.DataFrame) -> tuple[GdcDownload, str]:
    sheet, root, rows = write_download(tmp_path / "gdc", matrix)
    first = root / rows[0]["File ID"] / rows[0]["File Name"]
    if how == "missing_file":
        first.unlink()
        return GdcDownload(sheet, root), (rf"line 2 \({rows[0]['File Name']}\): file not found at .*{rows[0]['File ID']}/"
                                          r".*gdc-client puts each file in a folder named by its File ID")
    if how == "header":
        write_star(first, matrix.iloc[:, 0].tolist(), header=STAR_HEADER.replace("tpm_unstranded", "TPM"))
        return GdcDownload(sheet, root), r"line 2: the header is .*TPM.* not the STAR augmented gene counts header"
    if how == "no_model_line":
        first.write_text("\n".join([STAR_HEADER, *_star_rows([1, 2, 3, 4])]) + "\n")
        return GdcDownload(sheet, root), r"line 1: expected '# gene-model: \.\.\.'"
    if how == "mixed_models":
        write_star(root / rows[1]["File ID"] / rows[1]["File Name"], matrix.iloc[:, 1].tolist(), model="GENCODE v22")
        return GdcDownload(sheet, root), r"mixed gene models: .* is 'GENCODE v22', .* is 'GENCODE v36'"
    if how == "duplicate_sample":
        rows.append({**rows[0], "File ID": _uuid("again"), "File Name": "again.rna_seq.augmented_star_gene_counts.tsv"})
        write_star(root / _uuid("again") / "again.rna_seq.augmented_star_gene_counts.tsv", [1, 2, 3, 4])
        write_sheet(sheet, rows)
        return GdcDownload(sheet, root), (rf"line {len(rows) + 1} \(again.*\): sample {rows[0]['Sample ID']} also has the "
                                          rf"file {rows[0]['File Name']} \(line 2\)")
    if how == "unknown_sample_type":
        rows[1]["Sample Type"] = "Primary Tumour Tissue"
        write_sheet(sheet, rows)
        return GdcDownload(sheet, root), r"line 3 .*: unknown Sample Type 'Primary Tumour Tissue'"
    if how == "control_sample_type":
        rows[1]["Sample Type"] = "Control Analyte"
        rows[1]["Sample ID"] = rows[1]["Case ID"] + "-20A"
        write_sheet(sheet, rows)
        return GdcDownload(sheet, root), r"line 3 .*: Sample Type 'Control Analyte' \(code 20\) is neither tumour"
    if how == "type_disagrees":
        rows[1]["Sample Type"] = "Solid Tissue Normal" if rows[1]["Sample ID"].endswith("-01A") else "Primary Tumor"
        write_sheet(sheet, rows)
        return GdcDownload(sheet, root), r"line 3 .*: Sample ID .* has sample type \d\d but the sheet says"
    if how == "several_samples":
        rows[0]["Sample ID"] = f"{rows[0]['Sample ID']}, {rows[1]['Sample ID']}"
        write_sheet(sheet, rows)
        return GdcDownload(sheet, root), r"line 2 .*: 'Sample ID' holds 2 ids .* made from several samples"
    if how == "sheet_encoding":  # saved by a spreadsheet in its own code page
        sheet.write_bytes(sheet.read_text().replace("Primary Tumor", "Primary Tumor \u00e9").encode("cp1252"))
        return GdcDownload(sheet, root), r"GDC sample sheet .*: not a UTF-8 TSV .* save it again as UTF-8 text"
    if how == "compressed":
        import gzip

        first.write_bytes(gzip.compress(first.read_bytes()))
        return GdcDownload(sheet, root), rf"{first.name}: not a readable STAR gene counts TSV \(a compressed or damaged"
    if how == "extra_fields":
        first.write_text(first.read_text() + "ENSG00000012345.1\tX\tprotein_coding\t1\t1\t1\t1\t1\t1\t1\t1\t1\n")
        return GdcDownload(sheet, root), rf"{first.name}: not a readable STAR gene counts TSV"
    if how == "sheet_columns":
        sheet.write_text("id\tfilename\tmd5\tsize\tstate\n")
        return GdcDownload(sheet, root), r"lacks the columns \['File ID', 'File Name', 'Case ID', 'Sample ID', 'Sample Type or Tissue Type'\]"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing_file", "header", "no_model_line", "mixed_models", "duplicate_sample",
                                 "unknown_sample_type", "control_sample_type", "type_disagrees", "several_samples",
                                 "sheet_columns", "compressed", "extra_fields", "sheet_encoding"])
def test_each_malformed_download_is_refused_with_nothing_written(tiled_workspace, tmp_path, how) -> None:
    ws = tiled_workspace
    _params(ws)
    download, message = _break(tmp_path, how, _matrix(ws))
    before = Catalog.of(ws).query("SELECT count(*) AS n FROM expression")
    with pytest.raises(ExpressionFileError, match=message):
        ingest_labels(ws, ws.config(), gdc=download)
    assert current_label_set(Catalog.of(ws)) is None and not frames_dir(ws).exists()
    assert Catalog.of(ws).query("SELECT count(*) AS n FROM expression") == before


def test_repeated_ids_of_one_sample_are_one_sample_and_tissue_type_sheets_read(tmp_path) -> None:
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("File ID\tFile Name\tData Category\tData Type\tProject ID\tCase ID\tSample ID\tTissue Type\t"
                     "Tumor Descriptor\tSpecimen Type\tPreservation Method\n"
                     "f1\ta.tsv\tTranscriptome Profiling\tGene Expression Quantification\tTCGA-LUSC\t"
                     "TCGA-AA-0001, TCGA-AA-0001\tTCGA-AA-0001-01A, TCGA-AA-0001-01A\tTumor\tPrimary\tSolid Tissue\tOCT\n"
                     "f2\tb.tsv\tTranscriptome Profiling\tGene Expression Quantification\tTCGA-LUSC\t"
                     "TCGA-AA-0001\tTCGA-AA-0001-11A\tNormal\tNot Applicable\tSolid Tissue\tOCT\n")
    rows = read_gdc_sheet(sheet)
    assert [(r.sample_id, r.kind, r.type_code) for r in rows] == [("TCGA-AA-0001-01A", "tumor", "01"),
                                                                  ("TCGA-AA-0001-11A", "normal", "11")]
    assert rows[0].extra["Specimen Type"] == "Solid Tissue" and rows[0].project_id == "TCGA-LUSC"


# --- slides -----------------------------------------------------------------------------------------------------


def write_slide_download(root: Path, slides: list[dict], frozen_from: dict | None = None) -> tuple[Path, list[dict]]:
    """The catalog's slides as gdc-client lays them out (links to the real files), plus optionally a frozen
    section of one patient; and a slide sample sheet."""
    rows = []
    entries = [(s["slide_id"], Path(s["path"])) for s in slides]
    if frozen_from is not None:
        entries.append((frozen_from["patient_id"] + "-01A-01-TS1", Path(frozen_from["path"])))
    for barcode, src in entries:
        fid = _uuid(barcode)
        name = f"{barcode}.{_uuid(barcode + 'name').upper()}{src.suffix}"
        (root / fid).mkdir(parents=True)
        (root / fid / name).symlink_to(src)
        code = barcode[13:15]
        rows.append({"File ID": fid, "File Name": name, "Data Category": "Biospecimen", "Data Type": "Slide Image",
                     "Project ID": "TCGA-LUSC", "Case ID": barcode[:12], "Sample ID": barcode[:16],
                     "Sample Type": SAMPLE_TYPE[code]})
    sheet = root.parent / "slides_sample_sheet.tsv"
    write_sheet(sheet, rows)
    return sheet, rows


def test_slide_sources_from_a_gdc_download(tiled_workspace, tmp_path) -> None:
    slides = Catalog.of(tiled_workspace).slides(status="ok")
    tumour = next(s for s in slides if "-01Z-" in s["slide_id"])
    root = tmp_path / "slides"
    sheet, rows = write_slide_download(root, slides, frozen_from=tumour)
    extensions = tiled_workspace.config().ingest.extensions
    dx = gdc_slide_sources(root, extensions=extensions)
    assert sorted(s.slide_id for s in dx) == sorted(s["slide_id"] for s in slides)
    frozen = gdc_slide_sources(root, slide_type="frozen", extensions=extensions)
    assert [s.slide_id for s in frozen] == [tumour["patient_id"] + "-01A-01-TS1"]
    assert dict(frozen[0].attributes) == {"sample_type": "tumor", "slide_type": "frozen", "section": "TS1",
                                          "file_id": _uuid(frozen[0].slide_id)}
    assert frozen[0].patient_id == tumour["patient_id"]
    assert len(gdc_slide_sources(root, slide_type="all", extensions=extensions)) == len(slides) + 1
    listed = {s.slide_id: dict(s.attributes) for s in gdc_slide_sources(root, sheet, extensions=extensions)}
    normal = next(s["slide_id"] for s in slides if "-11Z-" in s["slide_id"])
    assert listed[tumour["slide_id"]]["subtype"] == "LUSC" and listed[tumour["slide_id"]]["project_id"] == "TCGA-LUSC"
    assert listed[tumour["slide_id"]]["gdc_sample_type"] == "Primary Tumor" and "subtype" not in listed[normal]
    assert listed[normal]["sample_type"] == "normal" and listed[normal]["slide_type"] == "dx"
    manifest = tmp_path / "gdc_manifest.txt"
    files = {r["File ID"]: root / r["File ID"] / r["File Name"] for r in rows}
    manifest.write_text("id\tfilename\tmd5\tsize\tstate\n" + "".join(
        f"{r['File ID']}\t{r['File Name']}\t{hashlib.md5(files[r['File ID']].read_bytes()).hexdigest()}\t"
        f"{files[r['File ID']].stat().st_size}\treleased\n" for r in rows))
    from_manifest = gdc_slide_sources(root, manifest, "all", extensions)
    assert len(from_manifest) == len(slides) + 1 and not from_manifest.refused


def test_malformed_slide_downloads_are_refused(tiled_workspace, tmp_path) -> None:
    slides = Catalog.of(tiled_workspace).slides(status="ok")[:2]
    root = tmp_path / "slides"
    sheet, rows = write_slide_download(root, slides)
    extensions = tiled_workspace.config().ingest.extensions
    wrong = [dict(r) for r in rows]
    wrong[1]["Case ID"], wrong[1]["Sample ID"] = "TCGA-ZZ-9999", "TCGA-ZZ-9999" + rows[1]["Sample ID"][12:]
    write_sheet(sheet, wrong)
    with pytest.raises(ManifestError, match=rf"line 3 .*: the slide {slides[1]['slide_id']} is of patient .*, the sheet "
                                            r"says Case ID TCGA-ZZ-9999"):
        gdc_slide_sources(root, sheet, extensions=extensions)
    write_sheet(sheet, [*rows, {**rows[0], "File ID": "not-there"}])
    with pytest.raises(ManifestError, match=r"line 4 .*: file not found at .*not-there"):
        gdc_slide_sources(root, sheet, extensions=extensions)
    (root / "x").mkdir()
    (root / "x" / f"{slides[0]['slide_id']}.copy.svs").symlink_to(slides[0]["path"])
    with pytest.raises(ManifestError, match=rf"slide {slides[0]['slide_id']} is also at"):
        gdc_slide_sources(root, extensions=extensions)
    (root / "x" / f"{slides[0]['slide_id']}.copy.svs").unlink()
    (root / "x" / "CMU-1.svs").symlink_to(slides[0]["path"])
    with pytest.raises(ManifestError, match=r"'CMU-1' is not a TCGA slide barcode"):
        gdc_slide_sources(root, extensions=extensions)
    with pytest.raises(ManifestError, match="slide type 'ffpe'"):
        gdc_slide_sources(root, slide_type="ffpe")


# --- the commands, end to end ------------------------------------------------------------------------------------


def invoke(ws, *args):
    return runner.invoke(app, ["--workspace", str(ws.root), *map(str, args)], env={"COLUMNS": "250"})


def test_gdc_commands_end_to_end(tiled_workspace, tmp_path) -> None:
    """`histcode ingest --gdc` registers the download's slides under their barcodes (the same pixels as the tiled
    ones: their tiles stay), `labels ingest --gdc` labels them with the clinical subtypes and the gate passes."""
    ws = tiled_workspace
    _params(ws)
    catalog = Catalog.of(ws)
    slides = catalog.slides(status="ok")
    tumour = next(s for s in slides if "-01Z-" in s["slide_id"])
    sheet, _ = write_slide_download(tmp_path / "slides", slides, frozen_from=tumour)
    result = invoke(ws, "ingest", "--gdc", tmp_path / "slides", "--gdc-sheet", sheet)
    assert result.exit_code == 0, result.output
    moved = catalog.slides(status="ok")
    assert {s["slide_id"] for s in moved} == {s["slide_id"] for s in slides}  # the frozen section was not taken
    assert all(json.loads(s["attributes"])["slide_type"] == "dx" and "/slides/" in s["path"] for s in moved)
    assert len(catalog.tiled_slides(spec_id_of(ws.config().tiling))) == len(slides)
    matrix = _matrix(ws)
    rna_sheet, rna_root, _ = write_download(tmp_path / "rna", matrix)
    patients = sorted({s["patient_id"] for s in slides})
    clinical = tmp_path / "clinical.tsv"
    clinical.write_text("case_id\tcase_submitter_id\tproject_id\n" + "".join(
        f"{_uuid(p)}\t{p}\t{'TCGA-LUAD' if i % 2 else 'TCGA-LUSC'}\n" for i, p in enumerate(patients)))
    result = invoke(ws, "labels", "ingest", "--gdc", rna_sheet, rna_root, "--clinical", clinical)
    assert result.exit_code == 0, result.output
    assert f"{len(matrix.columns)} samples, 4 genes, {len(patients)} patients" in result.output
    labels = pd.DataFrame(catalog.query("SELECT patient_id, subtype FROM slide_labels WHERE tumor"))
    assert dict(zip(labels.patient_id, labels.subtype)) == {p: "LUAD" if i % 2 else "LUSC" for i, p in enumerate(patients)}
    assert invoke(ws, "labels", "gate").exit_code == 0
    # a broken download: exit 2 with the reason, the current label set untouched
    version = current_label_set(catalog)["label_version"]
    next(rna_root.rglob("*.tsv")).unlink()
    result = invoke(ws, "labels", "ingest", "--gdc", rna_sheet, rna_root, "--force")
    assert result.exit_code == 2 and "file not found at" in result.output
    assert current_label_set(catalog)["label_version"] == version
    result = invoke(ws, "labels", "ingest", "expr.tsv", "--gdc", rna_sheet, rna_root)
    assert result.exit_code == 2 and "give no matrix" in result.output


def test_a_cart_with_samples_that_label_no_slide_fails_the_gate_or_drops_them(tiled_workspace, tmp_path) -> None:
    """A real cart holds RNA of patients without slides and blood normals: the gate names them (unmatched: fail),
    or they are left out and listed (unmatched: drop)."""
    ws = tiled_workspace
    matrix = _matrix(ws)
    matrix["TCGA-ZZ-9999-01A"] = matrix.iloc[:, 0]  # a patient with no slide
    patient = matrix.columns[0][:12]
    matrix[f"{patient}-10A"] = matrix.iloc[:, 0]  # a blood-derived normal of a patient with slides
    sheet, root, _ = write_download(tmp_path / "gdc", matrix)
    _params(ws)
    kept = ingest_labels(ws, ws.config(), gdc=GdcDownload(sheet, root))
    assert "TCGA-ZZ-9999 has no registered, tiled slide" in kept.problems["TCGA-ZZ-9999-01A"]
    assert "normal sample type 10 is not solid tissue normal (11)" in kept.problems[f"{patient}-10A"]
    assert not gate_labels(ws, ws.config()).passed
    _params(ws, unmatched="drop")
    dropped = ingest_labels(ws, ws.config(), gdc=GdcDownload(sheet, root))
    assert set(dropped.dropped) == {"TCGA-ZZ-9999-01A", f"{patient}-10A"} and not dropped.problems
    assert dropped.n_samples == len(matrix.columns) - 2
    assert gate_labels(ws, ws.config()).passed
    again = ingest_labels(ws, ws.config(), gdc=GdcDownload(sheet, root))
    assert again.reused and again.dropped == dropped.dropped  # the report of a reused label set still lists them


def test_labels_gdc_in_params_is_what_every_door_ingests(tiled_workspace, tmp_path) -> None:
    """labels.gdc names the download, so `dvc repro`, the flows and `labels ingest` without arguments read it, and
    passed_label_set recognises the label set it made."""
    from histcode.labels.run import passed_label_set

    ws = tiled_workspace
    sheet, root, _ = write_download(ws.root / "gdc", _matrix(ws))
    _params(ws, gdc={"sheet": str(sheet.relative_to(ws.root)), "dir": "gdc/rna"})
    made = ingest_labels(ws, ws.config())
    assert json.loads(current_label_set(Catalog.of(ws))["params"])["gdc_unit"] == "tpm_unstranded"
    assert gate_labels(ws, ws.config()).passed
    assert passed_label_set(ws, ws.config())["label_version"] == made.label_version
    assert ingest_labels(ws, ws.config()).reused
    with pytest.raises(ExpressionFileError, match="a sample sheet .* goes with a matrix, and labels.gdc names a GDC"):
        ingest_labels(ws, ws.config(), sample_sheet=ws.root / "sheet.csv")
    rows = read_gdc_sheet(sheet)
    target = root / rows[0].file_id / rows[0].file_name
    target.write_text(target.read_text().replace("# gene-model: GENCODE v36", "# gene-model: GENCODE v36 "))
    assert passed_label_set(ws, ws.config()) is None  # a counts file changed: ingest has work to do


def test_a_slide_is_labelled_only_by_an_aliquot_of_its_own_sample_type_and_only_once() -> None:
    from histcode.labels.expression import map_samples

    def slide(sid: str) -> dict:
        return {"slide_id": sid, "patient_id": sid[:12], "attributes": None}

    slides = [slide("TCGA-AA-0001-01Z-00-DX1"), slide("TCGA-AA-0001-01Z-00-DX2"), slide("TCGA-AA-0002-06Z-00-DX1")]
    out = map_samples(["TCGA-AA-0001-01B", "TCGA-AA-0001-01A", "TCGA-AA-0002-01A", "TCGA-AA-0002-06A",
                       "TCGA-AA-0001-11A"], slides).set_index("sample_id")
    assert out.loc["TCGA-AA-0001-01A", "slide_id"] == "TCGA-AA-0001-01Z-00-DX1" and out.problem.isna()["TCGA-AA-0001-01A"]
    assert "already labelled by sample TCGA-AA-0001-01A" in out.loc["TCGA-AA-0001-01B", "problem"]
    assert "are of another sample type" in out.loc["TCGA-AA-0002-01A", "problem"]  # a primary aliquot, a metastasis slide
    assert out.loc["TCGA-AA-0002-06A", "slide_id"] == "TCGA-AA-0002-06Z-00-DX1"
    assert out.problem.isna()["TCGA-AA-0001-11A"]


def test_every_slide_of_a_sample_gets_its_de_labels_and_counts_once() -> None:
    """A sample's DX1 and DX2 share its RNA's fold changes; the gene gate counts the sample (patient) once."""
    from histcode.config import LabelsConfig
    from histcode.labels.de import fold_changes, gene_inclusion
    from histcode.labels.expression import map_samples, sample_slides

    def slide(sid: str) -> dict:
        return {"slide_id": sid, "patient_id": sid[:12], "attributes": None}

    slides = [slide("TCGA-AA-0001-01Z-00-DX1"), slide("TCGA-AA-0001-01Z-00-DX2"), slide("TCGA-AA-0001-06Z-00-DX1"),
              slide("TCGA-AA-0002-01Z-00-DX1"), slide("TCGA-AA-0001-11Z-00-DX1")]
    ids = ["TCGA-AA-0001-01A", "TCGA-AA-0001-11A", "TCGA-AA-0002-01A"]
    samples = map_samples(ids, slides)
    slides_of = sample_slides(samples, slides)
    assert slides_of == {"TCGA-AA-0001-01A": ["TCGA-AA-0001-01Z-00-DX1", "TCGA-AA-0001-01Z-00-DX2"],
                         "TCGA-AA-0002-01A": ["TCGA-AA-0002-01Z-00-DX1"]}  # not the 06 metastasis slide
    matrix = pd.DataFrame({"TCGA-AA-0001-01A": [7.0], "TCGA-AA-0001-11A": [1.0], "TCGA-AA-0002-01A": [1.0]},
                          index=["SOX2"])
    cfg = LabelsConfig(panel=("SOX2",), min_class_size=1)
    frame = fold_changes(matrix, samples, cfg, slides_of=slides_of).set_index("slide_id")
    assert frame.loc["TCGA-AA-0001-01Z-00-DX2", "log2fc"] == frame.loc["TCGA-AA-0001-01Z-00-DX1", "log2fc"] == 2.0
    assert frame.loc["TCGA-AA-0001-01Z-00-DX2", "sample_id"] == "TCGA-AA-0001-01A"
    gate = gene_inclusion(frame.reset_index(), cfg, present={"SOX2"}).set_index("gene")
    assert (gate.loc["SOX2", "n_up"], gate.loc["SOX2", "n_unchanged"]) == (1, 1)


def test_a_slide_two_samples_could_claim_is_labelled_by_neither() -> None:
    from histcode.labels.expression import map_samples, sample_slides

    slides = [{"slide_id": f"P1-S{i}", "patient_id": "P1", "attributes": '{"sample_type": "tumor"}'} for i in (1, 2, 3)]
    sheet = pd.DataFrame({"sample_id": ["rnaA", "rnaB"], "patient_id": ["P1", "P1"], "slide_id": ["P1-S1", "P1-S2"],
                          "sample_type": ["tumor", "tumor"]})
    samples = map_samples(["rnaA", "rnaB"], slides, sheet)
    assert samples.problem.isna().all()
    assert sample_slides(samples, slides) == {"rnaA": ["P1-S1"], "rnaB": ["P1-S2"]}  # P1-S3 fits both: neither
    one = map_samples(["rnaA"], slides, sheet.iloc[:1])
    assert sample_slides(one, slides) == {"rnaA": ["P1-S1", "P1-S2", "P1-S3"]}  # unknown type: every tumour slide
