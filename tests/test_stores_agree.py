"""Nothing lost, nothing half-shown (issue 32), against real stores: the catalog's ledger and the Lance tables
checked against each other (a deleted table, rows gone from a slide), a commit that meets a full disk (injected
with ``HISTCODE_FAILPOINT=<point>:enospc``, and a real tmpfs where the tests run as root), a truncated catalog and
its backup, faults of the machine told from faults of the input, and label files refused with their reasons.
Each case ends in a clear message and a rerun that leaves what an uninterrupted run leaves."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess

import duckdb
import numpy as np
import pandas as pd
import pytest
import yaml

from histcode.errors import MachineFault, is_machine_fault
from histcode.features.embed import materialize
from histcode.features.read import slide_features, tile_features
from histcode.features.registry import load_view
from histcode.features.search import search
from histcode.ingest.run import ingest_sources
from histcode.ingest.sources import read_manifest
from histcode.labels.expression import ExpressionFileError
from histcode.labels.run import ingest_labels
from histcode.store.agreement import StoresDisagree, update_versions
from histcode.store.backup import backup_path
from histcode.store.catalog import Catalog
from histcode.store.sql import run_sql
from histcode.store.vectors import SLIDE_KIND, TILE_KIND, connect, delete_slides, latest_versions
from histcode.tiling.run import tile_slides
from histcode.workspace import Workspace
from tests.conftest import TINY_PRETRAIN
from tests.test_faults import histcode  # `histcode ARGS` in a process of its own, with a fail point
from tests.helpers import glass, write_svs

pytestmark = pytest.mark.integration
MACHINE_FAULT_EXIT = 4


def one_line(text: str) -> str:
    return " ".join(text.split())


def vectors(ws: Workspace, view) -> pd.DataFrame:
    return tile_features(ws, view, fmt="pandas").sort_values("tile_id").reset_index(drop=True)


def same_vectors(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.tile_id) == list(b.tile_id)  # none missing, none twice
    np.testing.assert_allclose(np.stack(a.vector), np.stack(b.vector), atol=1e-5)


def sql_count(ws: Workspace, table: str, view) -> int:
    return run_sql(ws, f"SELECT count(*) AS n FROM {table}", view.view_id).column("n")[0].as_py()


def rows(ws: Workspace, query: str) -> list[tuple]:
    return [tuple(r.values()) for r in Catalog.of(ws).query(query)]


# -- 1. a deleted Lance table ----------------------------------------------------------------------------------
def test_a_deleted_table_is_named_by_sql_and_search_and_embed_puts_it_back(embedded_workspace, copy_workspace) -> None:
    ws = copy_workspace(embedded_workspace)
    view = load_view(Catalog.of(ws), None)
    expected = vectors(ws, view)
    name = view.table(TILE_KIND).name
    shutil.rmtree(ws.lancedb_dir / f"{name}.lance")

    said = f"table {name} is missing, but the ledger records"
    with pytest.raises(StoresDisagree, match=said):
        sql_count(ws, "tile_embeddings", view)
    assert sql_count(ws, "slides", view) > 0  # the catalog alone still answers
    with pytest.raises(StoresDisagree, match=said):
        search(ws, view, ws.config().features, tile_id=expected.tile_id[0], k=3)

    report = materialize(ws, ws.config(), progress=False)  # a plain `histcode embed`
    slides = rows(ws, "SELECT count(*) FROM materializations WHERE status = 'ok'")[0][0]
    assert len(report.repairs) == 1 and said in report.repairs[0] and f"embedding {slides} slides again" in report.repairs[0]
    assert report.count("embedded") == slides
    same_vectors(vectors(ws, view), expected)
    assert sql_count(ws, "tile_embeddings", view) == len(expected)


def test_embed_recheck_finds_rows_moved_between_slides_that_the_totals_hide(embedded_workspace, copy_workspace) -> None:
    ws = copy_workspace(embedded_workspace)
    view = load_view(Catalog.of(ws), None)
    expected = vectors(ws, view)
    a, b = sorted(set(expected.slide_id))[:2]
    moved = list(expected.tile_id[expected.slide_id == a][:2])
    table = connect(ws.lancedb_uri).open_table(view.table(TILE_KIND).name)
    table.update(where=f"tile_id IN ('{moved[0]}', '{moved[1]}')", values={"slide_id": b})  # the totals still agree

    assert materialize(ws, ws.config(), progress=False).count("embedded") == 0  # the cheap check sees nothing
    assert sql_count(ws, "tile_embeddings", view) == len(expected)  # readers read the ledger's version
    report = materialize(ws, ws.config(), progress=False, recheck=True)
    assert len(report.repairs) == 1 and f"2 slides differ ({a}, {b})" in report.repairs[0]
    assert {o.slide_id for o in report.outcomes if o.action == "embedded"} == {a, b}
    same_vectors(vectors(ws, view), expected)


# -- 2. half of a failed write -------------------------------------------------------------------------------
def _without_two_slides(ws: Workspace, view) -> list[str]:
    """The view as it was before two of its slides were embedded (ledger, vectors and recorded versions)."""
    catalog = Catalog.of(ws)
    two = [r[0] for r in rows(ws, "SELECT slide_id FROM materializations ORDER BY slide_id LIMIT 2")]
    names = [view.table(kind).name for kind in (TILE_KIND, SLIDE_KIND)]
    delete_slides(ws.lancedb_uri, names, two)
    with catalog.transaction() as con:
        con.execute("DELETE FROM materializations WHERE slide_id IN (?, ?)", two)
        update_versions(con, latest_versions(ws.lancedb_uri, names))
    return two


def test_a_vector_commit_that_meets_a_full_disk_stays_unseen_and_a_rerun_completes_it(
        embedded_workspace, copy_workspace, monkeypatch) -> None:
    ws = copy_workspace(embedded_workspace)
    (ws.root / "params.yaml").write_text(yaml.safe_dump({"pretrain": TINY_PRETRAIN,
                                                         "features": {"commit_every_slides": 2}}))
    view = load_view(Catalog.of(ws), None)
    expected = vectors(ws, view)
    two = _without_two_slides(ws, view)
    served, slides = sql_count(ws, "tile_embeddings", view), sql_count(ws, "slide_embeddings", view)

    monkeypatch.setenv("HISTCODE_FAILPOINT", "embed.tiles_written:enospc")  # the tile table written, then the disk
    with pytest.raises(MachineFault, match="no space left on device while writing the vectors of 2 slides to view"):
        materialize(ws, ws.config(), progress=False)
    monkeypatch.delenv("HISTCODE_FAILPOINT")
    latest = connect(ws.lancedb_uri).open_table(view.table(TILE_KIND).name).count_rows()
    assert latest == len(expected) > served  # the half-written vectors are in the table ...
    assert sql_count(ws, "tile_embeddings", view) == served  # ... and unseen: the previous version is served whole
    assert sql_count(ws, "slide_embeddings", view) == slides
    hits = search(ws, view, ws.config().features, slide_id=sorted(set(expected.slide_id) - set(two))[0], k=10)
    assert not set(two) & set(hits.column("slide_id").to_pylist())
    assert Catalog.of(ws).query("SELECT count(*) AS n FROM materializations WHERE slide_id IN (?, ?)", two) == [{"n": 0}]
    from histcode.api import open as open_workspace  # the Python API reads the committed versions too

    api_view = open_workspace(ws.root).view(view.view_id)
    assert len(api_view.tiles(columns=["tile_id"])) == served and not set(two) & set(api_view.slides().slide_id)
    from histcode.viewer.cohort import ViewerData  # and so does the viewer's search

    viewer = ViewerData(ws)
    assert viewer._searcher(view).dataset.count_rows() == served
    tile = api_view.tiles(columns=["tile_id"]).tile_id.iloc[0]
    assert not set(two) & {h["slide_id"] for h in viewer.neighbours(view, tile, 50)}

    told = histcode(ws, "embed", failpoint="embed.committed:enospc")  # the command: one line, the cause named
    assert told.returncode == MACHINE_FAULT_EXIT and "Traceback" not in told.stderr, told.stderr[-2000:]
    assert "error: no space left on device while writing the vectors" in one_line(told.stderr)
    assert "free space on that disk and rerun" in one_line(told.stderr)

    report = materialize(ws, ws.config(), progress=False)  # the plain rerun
    assert {o.slide_id for o in report.outcomes if o.action == "embedded"} == set(two)
    same_vectors(vectors(ws, view), expected)
    assert sql_count(ws, "tile_embeddings", view) == len(expected)
    assert slide_features(ws, view).num_rows == len(set(expected.slide_id))


# -- 6. a write that meets a full disk leaves the previous version whole (issue 31) -----------------------------
def _new_slide(copy_slide, cmu_slide, tmp_path) -> list:
    path = copy_slide(cmu_slide)
    manifest = tmp_path / "new.csv"
    manifest.write_text(f"path,slide_id,patient_id\n{path},NEW-SLIDE,NEW-PATIENT\n")
    return read_manifest(manifest)


def test_a_catalog_commit_that_meets_a_full_disk_leaves_the_catalog_whole(
        tiled_workspace, copy_slide, cmu_slide, tmp_path, monkeypatch) -> None:
    ws = tiled_workspace
    catalog = Catalog.of(ws)
    before = rows(ws, "SELECT slide_id, content_hash FROM slides ORDER BY 1")
    sources = _new_slide(copy_slide, cmu_slide, tmp_path)
    monkeypatch.setenv("HISTCODE_FAILPOINT", "catalog.commit:enospc@2")  # the cohort is committed, then the slide
    with pytest.raises(MachineFault) as caught:
        ingest_sources(sources, catalog, ws.config().ingest, progress=False)
    monkeypatch.delenv("HISTCODE_FAILPOINT")
    said = str(caught.value)
    assert said.startswith(f"no space left on device while writing the catalog {catalog.path}")
    assert "nothing of slide NEW-SLIDE was written" in said and "a plain rerun registers them" in said
    assert rows(ws, "SELECT slide_id, content_hash FROM slides ORDER BY 1") == before
    ingest_sources(sources, catalog, ws.config().ingest, progress=False)
    assert rows(ws, "SELECT status FROM slides WHERE slide_id = 'NEW-SLIDE'") == [("ok",)]


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the injected full disk above runs everywhere")
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder) -> object:
    """Fill the file system of ``folder`` to the last byte; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_real_full_disk_leaves_the_catalog_whole_and_is_named(small_disk, tiled_catalog, copy_slide, cmu_slide,
                                                                tmp_path) -> None:
    ws = Workspace(small_disk / "ws").ensure()
    shutil.copy2(tiled_catalog, ws.catalog_path)
    digest = hashlib.sha256(ws.catalog_path.read_bytes()).hexdigest()
    sources = _new_slide(copy_slide, cmu_slide, tmp_path)
    filler = fill(small_disk)
    with pytest.raises(MachineFault, match="no space left on device while writing the catalog") as caught:
        ingest_sources(sources, Catalog.of(ws), ws.config().ingest, progress=False)
    assert "nothing of slide NEW-SLIDE was written" in str(caught.value)
    filler.unlink()
    shutil.rmtree(ws.data_dir / "labels", ignore_errors=True)
    assert hashlib.sha256(ws.catalog_path.read_bytes()).hexdigest() == digest  # the previous version, whole
    assert not Catalog.of(ws).query("SELECT 1 FROM slides WHERE slide_id = 'NEW-SLIDE'")
    ingest_sources(sources, Catalog.of(ws), ws.config().ingest, progress=False)  # space again: the plain rerun
    reference = Workspace(tmp_path / "reference").ensure()
    shutil.copy2(tiled_catalog, reference.catalog_path)
    ingest_sources(sources, Catalog.of(reference), reference.config().ingest, progress=False)
    query = "SELECT slide_id, status, content_hash, cohort FROM slides ORDER BY 1"
    assert rows(ws, query) == rows(reference, query)


# -- 4. a truncated catalog ----------------------------------------------------------------------------------
def test_a_truncated_catalog_is_told_with_its_backup_and_restored_from_it(tiled_workspace) -> None:
    from histcode.doctor import FAIL, DoctorOptions, run_doctor

    ws = tiled_workspace
    query = "SELECT slide_id, status, content_hash FROM slides ORDER BY 1"
    before = rows(ws, query)
    bak = backup_path(ws.catalog_path)
    assert histcode(ws, "slides").returncode == 0 and not bak.exists()  # a command that only read: no backup
    first = histcode(ws, "cohorts", "move", before[0][0], "--to", "second")  # one that wrote: backed up at its end
    assert first.returncode == 0 and bak.is_file(), first.stderr[-2000:]
    kept = bak.read_bytes()
    data = ws.catalog_path.read_bytes()
    ws.catalog_path.write_bytes(data[: len(data) // 2])

    told = histcode(ws, "slides")
    said = one_line(told.stderr)
    assert told.returncode == 2 and "Traceback" not in told.stderr, told.stderr[-2000:]
    assert f"error: the catalog {ws.catalog_path} is damaged" in said and "this command changed nothing in it" in said
    assert f"`cp {bak} {ws.catalog_path}`" in said
    assert bak.read_bytes() == kept  # a damaged catalog is never copied over its backup
    found = [f for f in run_doctor(ws, ws.config(), DoctorOptions(areas=("stores",)))
             if f.item == f"catalog {ws.catalog_path}"]
    assert found[0].status == FAIL and str(bak) in found[0].fix

    shutil.copy2(bak, ws.catalog_path)  # what the message says to do
    assert rows(ws, query) == before


# -- 3. faults of the machine and faults of the input -----------------------------------------------------------
def test_the_machine_s_faults_are_told_from_the_input_s() -> None:
    import duckdb as db

    from histcode.wsi.reader import SlideReadError

    machine = [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EIO, "Input/output error"),
               OSError(errno.EMFILE, "Too many open files"), MemoryError(),
               RuntimeError("lance error: LanceError(IO): Unable to copy data to file: No space left on device "
                            "(os error 28), /src/io/commit.rs:1663:50"),
               db.TransactionException('Failed to commit: Could not write file "/x/c.duckdb.wal": No space left on device')]
    chained = ValueError("could not write the QC picture")
    chained.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert all(is_machine_fault(e) for e in machine + [chained])
    assert not any(is_machine_fault(e) for e in (ValueError("no tissue"), OSError(errno.ENOENT, "No such file"),
                                                 SlideReadError("a.svs: not a slide"), KeyError("mpp")))
    fault = MachineFault(errno.ENOSPC, "tiling slide S")
    assert str(fault) == "no space left on device while tiling slide S; nothing was committed; free space on that disk and rerun"


def test_a_full_disk_while_tiling_is_not_attempted_and_a_bad_slide_is_failed(tiny_cohort, tiled_catalog, tmp_path,
                                                                             monkeypatch) -> None:
    ws = Workspace(tmp_path / "ws").ensure()
    catalog = Catalog.of(ws)
    cfg = ws.config()
    blank = write_svs(tmp_path / "in" / "blank.svs", glass(1024, 1024))
    sources = read_manifest(tiny_cohort.manifest)
    manifest = tmp_path / "blank.csv"
    manifest.write_text(f"path,slide_id,patient_id\n{blank},BLANK,P-BLANK\n")
    monkeypatch.setenv("HISTCODE_FAILPOINT", "ingest.slide:enospc@2")
    with pytest.raises(MachineFault, match="no space left on device while registering slide .* the 1 slides "
                                           "registered before it are kept"):
        ingest_sources(sources, catalog, cfg.ingest, progress=False)
    monkeypatch.delenv("HISTCODE_FAILPOINT")
    assert len(catalog.slides()) == 1
    ingest_sources(sources + read_manifest(manifest), catalog, cfg.ingest, progress=False)  # the plain rerun
    reference = Catalog(tiled_catalog)
    query = "SELECT slide_id, status, content_hash FROM slides WHERE slide_id != 'BLANK' ORDER BY 1"
    assert rows(ws, query) == [tuple(r.values()) for r in reference.query(query)]

    tiling = cfg.tiling.model_copy(update={"workers": 1})
    monkeypatch.setenv("HISTCODE_FAILPOINT", "tiling.slide:enospc@3")
    with pytest.raises(MachineFault) as caught:
        tile_slides(catalog, tiling, ws.outputs_dir / "qc", progress=False)
    monkeypatch.delenv("HISTCODE_FAILPOINT")
    said = str(caught.value)
    assert said.startswith("no space left on device while tiling slide ") and "the 2 slides committed before it" in said
    ledger = rows(ws, "SELECT slide_id, status FROM tilings")
    assert len(ledger) == 2  # nothing of the third slide: not attempted, not failed
    report = tile_slides(catalog, tiling, ws.outputs_dir / "qc", progress=False)  # no --retry-failed
    assert [o.slide_id for o in report.failed] == ["BLANK"] and "no tissue detected" in report.failed[0].reason
    query = "SELECT tile_id, slide_id, x, y, size FROM tiles WHERE slide_id != 'BLANK' ORDER BY tile_id"
    assert rows(ws, query) == [tuple(r.values()) for r in reference.query(query)]
    again = tile_slides(catalog, tiling, ws.outputs_dir / "qc", progress=False)  # the input's fault stays failed
    assert again.count("tiled") == 0 and [o.slide_id for o in again.failed] == ["BLANK"]


# -- 5. labels --------------------------------------------------------------------------------------------------
def _matrix(tiny_cohort) -> pd.DataFrame:
    return pd.read_csv(tiny_cohort.out_dir / "expression.tsv", sep="\t", dtype=str, keep_default_na=False)


@pytest.mark.parametrize("how", ["header_only", "no_gene_column", "latin1"])
def test_a_label_file_that_is_no_matrix_is_refused_by_name(tiled_workspace, tiny_cohort, how) -> None:
    ws = tiled_workspace
    frame = _matrix(tiny_cohort)
    path = ws.root / "expr.tsv"
    if how == "header_only":
        path.write_text("\t".join(frame.columns) + "\n")
        said = "expr.tsv: a header (7 sample columns) and no rows: no gene has an expression value".replace(
            "7", str(len(frame.columns) - 1))
    elif how == "no_gene_column":
        frame.drop(columns=[frame.columns[0]]).to_csv(path, sep="\t", index=False)
        said = f"expr.tsv: the first column is {frame.columns[1]!r}, a sample's barcode: the gene-id column is missing"
    else:
        frame.loc[2, frame.columns[0]] = "CAFÉ1"
        path.write_bytes(frame.to_csv(sep="\t", index=False).encode("latin-1"))
        said = "expr.tsv: the expression file is not UTF-8 text: line 4, byte 4 is 0xc9"
    with pytest.raises(ExpressionFileError) as caught:
        ingest_labels(ws, ws.config(), path)
    assert said in str(caught.value)
    if how == "latin1":
        assert f"iconv -f latin1 -t utf8 {path} > expr.utf8.tsv" in str(caught.value)
    assert Catalog.of(ws).query("SELECT * FROM label_sets") == []  # nothing half-written
    good = ingest_labels(ws, ws.config(), tiny_cohort.out_dir / "expression.tsv")  # the fixed file goes through
    assert rows(ws, "SELECT label_version FROM label_sets WHERE is_current") == [(good.label_version,)]


def test_a_tiled_tumour_slide_without_an_expression_column_is_named(tiled_workspace, tiny_cohort, caplog) -> None:
    from histcode.reports import labels_summary

    ws = tiled_workspace
    frame = _matrix(tiny_cohort)
    tumour = next(c for c in frame.columns[1:] if c.split("-")[3].startswith("01"))
    patient = "-".join(tumour.split("-")[:3])
    path = ws.root / "expr.tsv"
    frame.drop(columns=[tumour]).to_csv(path, sep="\t", index=False)
    labelled = ingest_labels(ws, ws.config(), path)
    slides = [s for s in labelled.unlabelled]
    assert slides and all(s.startswith(patient) for s in slides)
    assert "with no expression column: it gets no DE labels" in labelled.unlabelled[slides[0]]
    assert f"the matrix has no tumour sample of patient {patient}" in labelled.unlabelled[slides[0]]
    assert any(slides[0] in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert labels_summary(labelled)["unlabelled_tumour_slides"] == labelled.unlabelled
    assert rows(ws, f"SELECT count(*) FROM de_labels WHERE slide_id = '{slides[0]}'") == [(0,)]
    assert rows(ws, f"SELECT tumor FROM slide_labels WHERE slide_id = '{slides[0]}'") == [(True,)]  # kept, not dropped
    full = ingest_labels(ws, ws.config(), tiny_cohort.out_dir / "expression.tsv")
    assert full.unlabelled == {}


def test_labels_reach_the_slides_of_an_imported_view(tiny_cohort, tmp_path) -> None:
    from histcode.exchange.importing import import_features
    from tests.test_exchange import trident_folder

    ws = Workspace(tmp_path / "ws").ensure()
    catalog = Catalog.of(ws)
    ingest_sources(read_manifest(tiny_cohort.manifest), catalog, ws.config().ingest, progress=False)  # never tiled
    slides = catalog.slides("ok")
    trident_folder(tmp_path, slides, np.random.default_rng(0))
    assert not import_features(ws, ws.config(), "trident", tmp_path / "job").failed
    labelled = ingest_labels(ws, ws.config(), tiny_cohort.out_dir / "expression.tsv")
    assert {r[0] for r in rows(ws, "SELECT slide_id FROM slide_labels")} == {s["slide_id"] for s in slides}
    assert rows(ws, "SELECT count(DISTINCT slide_id) FROM de_labels")[0][0] > 0 and labelled.unlabelled == {}


def test_a_fail_point_waits_for_its_pass_and_raises_a_full_disk(monkeypatch) -> None:
    from histcode.runtime import failpoint

    monkeypatch.setenv("HISTCODE_FAILPOINT", "x.point:enospc@3")
    failpoint("x.other")
    failpoint("x.point")
    failpoint("x.point")
    with pytest.raises(OSError) as caught:
        failpoint("x.point")
    assert caught.value.errno == errno.ENOSPC and is_machine_fault(caught.value)


def test_duckdb_damage_is_told_as_damage(tmp_path) -> None:
    from histcode.store.backup import is_damage, whole

    path = tmp_path / "c.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE meta AS SELECT 'schema_version' AS key, '10' AS value")
    con.execute("CREATE TABLE t AS SELECT range AS x FROM range(300000)")
    con.close()
    assert whole(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not whole(path)
    assert is_damage(duckdb.IOException('IO Error: Could not read enough bytes from file "c.duckdb"'))
    assert not is_damage(duckdb.IOException("Could not set lock on file"))
    assert not is_damage(duckdb.CatalogException("Table with name x does not exist"))
