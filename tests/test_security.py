"""Safe to share (issue 31): what a workspace, a model or a manifest from someone else can plant is refused
with a reason, and nothing of it runs or is written.

The attacks are real: a pickle whose unpickling runs code (it writes a marker file, and a plain
``mlflow.pytorch.load_model`` is shown to run it), a cross join that would run for minutes, a manifest whose
file names climb out of the download folder."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pytest
import torch
import yaml

from histcode.heads.apply import load_head
from histcode.heads.names import MODEL_NAMES
from histcode.tracking import Tracker, UnsafeModelError
from histcode.workspace import Workspace

# --- models: a pickle planted in the registry -------------------------------------------------------------------


class Payload:
    """Unpickled, it runs code: ``exec`` of a line that writes ``marker`` (what `id` or a reverse shell would be)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _torch_pickle(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer, pickle_module=pickle)
    return buffer.getvalue()


def _register_head(tracker: Tracker) -> Path:
    """A tumour head registered as HistCode registers one (@best); returns its logged model's folder on disk."""
    name = MODEL_NAMES["tumor"]
    with tracker.run("heads", "head") as run_id:
        tracker.log_torch_model(run_id, torch.nn.Linear(4, 2).eval(), "model", (4,), 2, name, aliases=("best",),
                                version_tags={"view_id": "fv-test", "encoder_uri": "models:/histcode-encoder/1",
                                              "aggregator": "mean", "classes": "normal,tumor"})
    version = tracker.client.get_model_version_by_alias(name, "best")
    model_id = version.model_id or version.source.removeprefix("models:/")
    location = tracker.client.get_logged_model(model_id).artifact_location
    return Path(url2pathname(urlparse(location).path))


def _replace_record(program: Path, suffix: str, content: bytes) -> str:
    """Rewrite the pt2 archive with the record whose name ends in ``suffix`` replaced; returns its name."""
    with zipfile.ZipFile(program) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    (name,) = [n for n in records if n.endswith(suffix)]
    records[name] = content
    with zipfile.ZipFile(program, "w", zipfile.ZIP_STORED) as archive:
        for record, data in records.items():
            archive.writestr(record, data)
    return name


def _plant_pickle(folder: Path, marker: Path) -> str:
    """The issue's attack: a model.pth with pickle_module_info.txt in place of model.pt2."""
    (folder / "data" / "model.pt2").unlink()
    (folder / "data" / "model.pth").write_bytes(_torch_pickle(marker))
    (folder / "data" / "pickle_module_info.txt").write_text("pickle")
    return r"data/model\.pth, a pickle"


def _plant_renamed_pickle(folder: Path, marker: Path) -> str:
    (folder / "data" / "notes.txt").write_bytes(pickle.dumps(Payload(marker)))
    return r"data/notes\.txt, a pickle"


def _plant_code(folder: Path, marker: Path) -> str:
    conf = yaml.safe_load((folder / "MLmodel").read_text())
    conf["flavors"]["pytorch"]["code"] = "code"
    (folder / "MLmodel").write_text(yaml.safe_dump(conf))
    (folder / "code").mkdir()
    (folder / "code" / "torch.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return r"pytorch flavour ships code \('code'\)"


def _plant_elsewhere(folder: Path, marker: Path) -> str:
    conf = yaml.safe_load((folder / "MLmodel").read_text())
    conf["flavors"]["pytorch"]["model_data"] = "../../elsewhere"
    (folder / "MLmodel").write_text(yaml.safe_dump(conf))
    return r"reads '\.\./\.\./elsewhere', not the data/ folder"


def _plant_pickled_record(folder: Path, marker: Path) -> str:
    """A pt2 archive whose sample inputs are a pickle: torch.export.load falls back to a full unpickle for them."""
    _replace_record(folder / "data" / "model.pt2", "sample_inputs/model.pt", _torch_pickle(marker))
    return r"record model/data/sample_inputs/model\.pt of its data/model\.pt2 is not a pickle-free payload"


PLANTS = {"pickle": _plant_pickle, "renamed pickle": _plant_renamed_pickle, "shipped code": _plant_code,
          "data elsewhere": _plant_elsewhere, "pickled record in the pt2": _plant_pickled_record}

@pytest.fixture(scope="module")
def head_store(tmp_path_factory) -> tuple[Workspace, Path, Path]:
    """A workspace with a registered tumour head, its logged model's folder, and a pristine copy of that folder."""
    ws = Workspace(tmp_path_factory.mktemp("planted") / "ws").ensure()
    folder = _register_head(Tracker(ws))
    pristine = ws.root.parent / "pristine"
    shutil.copytree(folder, pristine)
    return ws, folder, pristine


@pytest.fixture
def registered_head(head_store) -> tuple[Workspace, Path]:
    """The registered head as it was logged (each test plants into it afresh)."""
    ws, folder, pristine = head_store
    shutil.rmtree(folder)
    shutil.copytree(pristine, folder)
    return ws, folder


PLAIN_MLFLOW_LOAD = """
import os, sys
os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)  # MLflow 3's default: pickle allowed
import mlflow.pytorch
for folder in sys.argv[1:]:
    try:
        mlflow.pytorch.load_model(folder)
    except Exception as exc:  # the payload returns None, not a model: loading fails after it ran
        print(type(exc).__name__, exc)
"""


def test_the_planted_pickle_runs_code_under_plain_mlflow(head_store, tmp_path) -> None:
    """The attack is real: MLflow's own loader, as HistCode called it before, runs the payload."""
    copy = head_store[2]
    plants = (_plant_pickle, _plant_pickled_record)
    for plant in plants:
        shutil.copytree(copy, tmp_path / plant.__name__)
        plant(tmp_path / plant.__name__, tmp_path / f"ran-{plant.__name__}")
    subprocess.run([sys.executable, "-c", PLAIN_MLFLOW_LOAD, *(str(tmp_path / p.__name__) for p in plants)],
                   capture_output=True, text=True, timeout=300, check=True)
    for plant in plants:
        assert (tmp_path / f"ran-{plant.__name__}").read_text() == "ran", plant.__name__


@pytest.mark.parametrize("plant", PLANTS, ids=list(PLANTS))
def test_a_planted_model_is_refused_and_runs_nothing(registered_head, tmp_path, monkeypatch, plant) -> None:
    ws, folder = registered_head
    tracker = Tracker(ws)
    uri = f"models:/{MODEL_NAMES['tumor']}@best"
    x = torch.rand(3, 4)
    assert tracker.load_model(uri)(x).shape == (3, 2)  # as logged, it loads
    marker = tmp_path / "ran"
    reason = PLANTS[plant](folder, marker)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # even a user's "allow" does not open the door
    with pytest.raises(UnsafeModelError, match=rf"model {uri} refused, nothing of it was loaded: .*{reason}"):
        tracker.load_model(uri)
    head = load_head(tracker, "tumor")  # the head loader (predict, view, heatmaps) loads the same way
    with pytest.raises(UnsafeModelError, match=rf"models:/{MODEL_NAMES['tumor']}/{head.version} refused.*{reason}"):
        head.model
    assert not marker.exists()
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "true"  # the refusal is scoped to HistCode's loads


def test_a_weights_reference_outside_its_run_is_refused() -> None:
    from histcode.tracking.model_files import check_weights_reference

    good = {"run_id": "0" * 32, "artifact": "encoder_module/state.pt"}
    assert check_weights_reference(good, "models:/e/1") == good
    for bad in ({"run_id": "0" * 32, "artifact": "../../../etc/passwd"}, {"run_id": "0" * 32, "artifact": "/etc/x"},
                {"run_id": "../x", "artifact": "a"}, {"run_id": "0" * 32}, "file:///etc/passwd"):
        with pytest.raises(UnsafeModelError, match="models:/e/1 refused"):
            check_weights_reference(bad, "models:/e/1")


# --- SQL: limits, and a workspace path with a quote -------------------------------------------------------------


@pytest.fixture
def quoted_workspace(tmp_path) -> Workspace:
    """A workspace whose folder name holds a ``'`` (it broke the catalog's ATTACH), with a catalog in it."""
    from histcode.store.catalog import Catalog

    ws = Workspace(tmp_path / "o'brien's lab").ensure()
    with Catalog.of(ws).connect():
        pass
    return ws


CROSS_JOIN = "SELECT count(*) AS n FROM range(200000) a, range(200000) b WHERE (a.range * b.range) % 7 = 3"


def test_a_runaway_query_is_stopped_at_its_time_limit(quoted_workspace) -> None:
    import time

    from histcode.store.sql import QueryLimitError, SqlLimits, run_sql

    assert run_sql(quoted_workspace, "SELECT count(*) AS n FROM slides").column("n").to_pylist() == [0]
    started = time.monotonic()
    with pytest.raises(QueryLimitError, match=r"ran past its time limit of 0\.5 s and was stopped; .*--time-limit"):
        run_sql(quoted_workspace, CROSS_JOIN, limits=SqlLimits(time_limit_s=0.5))  # 4e10 rows: minutes unlimited
    assert time.monotonic() - started < 20  # stopped, not run to the end
    assert run_sql(quoted_workspace, "SELECT 1 AS one").column("one").to_pylist() == [1]  # a fresh session after


def test_sql_memory_and_threads_are_limited_and_locked(quoted_workspace) -> None:
    from histcode.store.sql import QueryLimitError, ReadOnlyQueryError, SqlLimits, run_sql

    settings = "SELECT current_setting('memory_limit') AS m, current_setting('threads') AS t, " \
               "current_setting('temp_directory') AS d, current_setting('lock_configuration') AS l"
    got = run_sql(quoted_workspace, settings, limits=SqlLimits(memory_limit="300MB", threads=1)).to_pylist()[0]
    assert got["m"] == "286.1 MiB" and int(got["t"]) == 1 and got["d"] == "" and got["l"] in (True, "true")
    default = run_sql(quoted_workspace, settings).to_pylist()[0]
    assert default["m"] == "3.7 GiB" and 1 <= int(default["t"]) <= 4
    with pytest.raises(QueryLimitError, match=r"ran past its memory limit of 64MB .*--memory-limit"):
        run_sql(quoted_workspace, "SELECT list(range) AS l FROM range(50000000) GROUP BY range % 3",
                limits=SqlLimits(memory_limit="64MB", time_limit_s=120))
    with pytest.raises(ReadOnlyQueryError, match="SET statements are refused"):
        run_sql(quoted_workspace, "SET memory_limit = '100GB'")
    for bad in ({"memory_limit": "1GB'; DROP"}, {"time_limit_s": 0}, {"threads": -1}):
        with pytest.raises(ValueError, match="SQL"):
            SqlLimits(**bad)


def test_histcode_sql_takes_its_limits(quoted_workspace) -> None:
    from typer.testing import CliRunner

    from histcode.cli import app

    runner = CliRunner()
    base = ["--workspace", str(quoted_workspace.root), "sql"]
    out = runner.invoke(app, [*base, CROSS_JOIN, "--time-limit", "0.5"], env={"COLUMNS": "250"})
    assert out.exit_code == 2 and "time limit of 0.5 s" in out.output
    out = runner.invoke(app, [*base, "SELECT current_setting('memory_limit') AS m", "--memory-limit", "1GB",
                              "--format", "csv"])
    assert out.exit_code == 0 and "953.6 MiB" in out.stdout, out.output
    out = runner.invoke(app, [*base, "SELECT 1", "--memory-limit", "lots"], env={"COLUMNS": "250"})
    assert out.exit_code == 2 and "give a size such as 512MB" in out.output


# --- GDC manifests: sizes, checksums and names ------------------------------------------------------------------

MANIFEST_HEADER = "id\tfilename\tmd5\tsize\tstate\n"


def _gdc_download(root: Path, n: int) -> list[dict]:
    """``n`` small real slides laid out as gdc-client writes them (DIR/<File ID>/<barcode>.<uuid>.svs), with the
    manifest rows GDC would give for them (md5 and size of the bytes on disk)."""
    import uuid

    from tests.helpers import slide_with_rect, write_svs

    rows = []
    for i in range(n):
        barcode = f"TCGA-SX-{i:04d}-01Z-00-DX1"
        file_id = str(uuid.uuid5(uuid.NAMESPACE_URL, barcode))
        name = f"{barcode}.{str(uuid.uuid5(uuid.NAMESPACE_URL, barcode + 'name')).upper()}.svs"
        image = slide_with_rect(np.random.default_rng(i), (384, 512), (64, 64, 448, 320))
        path = write_svs(root / file_id / name, image)
        data = path.read_bytes()
        rows.append({"id": file_id, "filename": name, "md5": hashlib.md5(data).hexdigest(), "size": len(data),
                     "barcode": barcode, "path": path})
    return rows


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text(MANIFEST_HEADER + "".join(f"{r['id']}\t{r['filename']}\t{r['md5']}\t{r['size']}\treleased\n"
                                              for r in rows))
    return path


def test_a_gdc_slide_that_is_not_the_listed_file_is_refused_and_the_rest_go_on(workspace, tmp_path) -> None:
    from histcode.ingest.gdc import ingest_gdc
    from histcode.store.catalog import Catalog

    root = tmp_path / "gdc"
    rows = _gdc_download(root, 3)
    truncated, damaged, good = rows
    with truncated["path"].open("r+b") as fh:  # an interrupted download
        fh.truncate(truncated["size"] - 100)
    original = damaged["path"].read_bytes()
    data = bytearray(original)  # the same size, one byte flipped
    data[len(data) // 2] ^= 0xFF
    damaged["path"].write_bytes(bytes(data))
    manifest = _write_manifest(tmp_path / "gdc_manifest.txt", rows)
    catalog, cfg = Catalog.of(workspace), workspace.config().ingest
    report = ingest_gdc(root, manifest, catalog, cfg, progress=False)
    reasons = {o.slide_id: o.reason for o in report.failed}
    assert reasons.keys() == {truncated["barcode"], damaged["barcode"]}
    assert (f"its size is {truncated['size'] - 100} bytes, the manifest says {truncated['size']}"
            in reasons[truncated["barcode"]])
    found = hashlib.md5(bytes(data)).hexdigest()
    assert f"its md5 is {found}, the manifest says {damaged['md5']}" in reasons[damaged["barcode"]]
    assert all(r["filename"] in reasons[r["barcode"]] for r in (truncated, damaged))
    registered = {s["slide_id"]: s for s in catalog.slides()}
    assert list(registered) == [good["barcode"]]  # nothing of the refused ones written
    assert '"gdc_md5": "' + good["md5"] in registered[good["barcode"]]["attributes"]

    damaged["path"].write_bytes(original)  # downloaded again
    again = ingest_gdc(root, manifest, catalog, cfg, progress=False)
    assert [o.slide_id for o in again.failed] == [truncated["barcode"]]
    assert {o.slide_id: o.action for o in again.outcomes}[good["barcode"]] == "unchanged"
    assert set(s["slide_id"] for s in catalog.slides()) == {good["barcode"], damaged["barcode"]}


def test_gdc_names_that_leave_the_download_are_refused_by_name(tmp_path) -> None:
    from histcode.ingest.gdc import gdc_slide_sources, read_gdc_sheet
    from histcode.ingest.sources import ManifestError

    root = tmp_path / "gdc"
    (row,) = _gdc_download(root, 1)
    outside = tmp_path / "secret" / "TCGA-SX-0009-01Z-00-DX1.X.svs"
    outside.parent.mkdir()
    outside.write_bytes(row["path"].read_bytes())
    for field, value in (("filename", "../../secret/TCGA-SX-0009-01Z-00-DX1.X.svs"), ("id", ".."),
                         ("filename", "sub\\TCGA-SX-0009-01Z-00-DX1.X.svs"), ("id", "/etc")):
        manifest = _write_manifest(tmp_path / "gdc_manifest.txt", [{**row, field: value}])
        with pytest.raises(ManifestError, match=rf"line 2 .*: {field} {re.escape(repr(value))} "
                                                r"(holds a path separator|is a relative path component)"):
            gdc_slide_sources(root, manifest)
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("File ID\tFile Name\tCase ID\tSample ID\tSample Type\n"
                     f"{row['id']}\t../../secret/x.svs\tTCGA-SX-0000\tTCGA-SX-0000-01A\tPrimary Tumor\n")
    with pytest.raises(ManifestError, match=r"line 2 .*File Name '\.\./\.\./secret/x\.svs' holds a path separator"):
        read_gdc_sheet(sheet)
    for bad, match in (({"md5": "0"}, "is not an MD5 digest"), ({"size": "12kB"}, "is not a number of bytes")):
        with pytest.raises(ManifestError, match=match):
            gdc_slide_sources(root, _write_manifest(tmp_path / "gdc_manifest.txt", [{**row, **bad}]))
