"""The public Python API (histcode.api, re-exported as histcode.*) on real workspaces: the answers are checked
against the stores read another way (DuckDB on the catalog file, Lance on the tables, MLflow's own client) or
against the CLI's output, not against the API's own helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import lance
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import histcode
from histcode.api import BagDataset, FilterError, LabelGateError, ReadOnlyQueryError, ViewError


def _catalog_rows(ws, sql: str) -> list[tuple]:
    con = duckdb.connect(str(ws.catalog_path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _lance(ws, table: str):
    return lance.dataset(str(ws.lancedb_dir / f"{table}.lance"))


def test_the_public_names_are_listed_once_and_import_lazily() -> None:
    import histcode.api as api

    assert tuple(api.__all__) == histcode.PUBLIC
    for name in api.__all__:
        assert getattr(histcode, name) is getattr(api, name), name
        if name != "Format":  # a typing.Literal alias: documented where it is defined
            assert getattr(api, name).__doc__, f"histcode.{name} has no docstring"
    undocumented = [f"{cls.__name__}.{member}" for cls in (api.Workspace, api.View, api.BagDataset, api.Labels)
                    for member, value in vars(cls).items()
                    if not member.startswith("_") and (callable(value) or isinstance(value, (property, classmethod)))
                    and not (value.__func__ if isinstance(value, classmethod) else value).__doc__]
    assert not undocumented, f"public members without a docstring: {undocumented}"
    # `import histcode` does not pull in the stores, MLflow or torch
    code = "import sys, histcode; print(sorted(m for m in ('torch', 'mlflow', 'lancedb', 'histcode.api') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    with pytest.raises(AttributeError):
        histcode.no_such_name  # noqa: B018


def test_open_reads_the_workspace_its_cohorts_and_slides(embedded_workspace, tmp_path, monkeypatch) -> None:
    ws = histcode.open(embedded_workspace.root)
    assert ws.root == embedded_workspace.root
    assert ws.config.tiling.tile_px > 0
    slides = ws.slides()
    assert sorted(slides.slide_id) == sorted(r[0] for r in _catalog_rows(embedded_workspace, "SELECT slide_id FROM slides"))
    assert isinstance(slides.attributes[0], dict)
    cohorts = ws.cohorts()
    assert int(cohorts.slides.sum()) == len(slides)
    monkeypatch.setenv("HISTCODE_HOME", str(embedded_workspace.root))
    assert histcode.open().root == embedded_workspace.root  # the CLI's default
    with pytest.raises(histcode.WorkspaceNotFound, match="no workspace at"):
        histcode.open(tmp_path / "nowhere")
    with pytest.raises(histcode.CatalogError, match="no catalog"):
        histcode.open(tmp_path).slides()


def test_a_view_reads_tiles_and_slides_as_the_lance_tables_hold_them(embedded_workspace) -> None:
    ws = histcode.open(embedded_workspace.root)
    views = ws.views()
    assert len(views) == 1 and bool(views["default"][0])
    view = ws.view()
    assert ws.view(view.view_id).view_id == view.view_id
    assert ws.view(f"@{view.method}").view_id == view.view_id  # the encoder's alias is its method
    raw = _lance(embedded_workspace, f"tile_emb__{view.view_id.replace('-', '_')}").to_table()
    tiles = view.tiles(format="arrow")
    assert isinstance(tiles, pa.Table) and tiles.num_rows == raw.num_rows
    assert sorted(tiles.column("tile_id").to_pylist()) == sorted(raw.column("tile_id").to_pylist())
    frame = view.tiles()
    assert isinstance(frame, pd.DataFrame) and len(frame.vector[0]) == view.dim  # pandas by default
    polars = pytest.importorskip("polars")
    assert isinstance(view.tiles(format="polars"), polars.DataFrame)

    one = raw.column("slide_id")[0].as_py()
    some = view.tiles(slide_ids=[one], columns=["tile_id", "slide_id", "x"])
    assert list(some.columns) == ["tile_id", "slide_id", "x"] and set(some.slide_id) == {one}
    assert len(some) == sum(s == one for s in raw.column("slide_id").to_pylist())
    xs = np.asarray(raw.column("x").to_pylist())
    cut = int(np.median(xs))
    wide = view.tiles(f"x >= {cut}")
    assert len(wide) == int((xs >= cut).sum())
    assert len(view.tiles(slide_ids=[])) == 0
    # ids and a filter together: the slide's tiles that pass the filter, whatever the columns asked for
    sids = np.asarray(raw.column("slide_id").to_pylist())
    both = view.tiles(f"x >= {cut}", slide_ids=[one], columns=["tile_id"])
    assert len(both) == int(((xs >= cut) & (sids == one)).sum())
    tids = raw.column("tile_id").to_pylist()[:5]
    crossed = view.tiles(tile_ids=tids, slide_ids=[one], columns=["tile_id"])
    assert sorted(crossed.tile_id) == sorted(t for t, s in zip(tids, sids[:5]) if s == one)

    streamed = list(view.iter_tiles(batch_size=7, columns=["tile_id"], format="arrow"))
    assert all(b.num_rows <= 7 for b in streamed) and sum(b.num_rows for b in streamed) == raw.num_rows
    filtered = pd.concat(view.iter_tiles(f"x >= {cut}", batch_size=5, columns=["tile_id"], as_of="first"))
    assert sorted(filtered.tile_id) == sorted(wide.tile_id)

    slides = view.slides()
    catalog_slides = _catalog_rows(embedded_workspace, f"SELECT count(*) FROM materializations WHERE view_id = "
                                                       f"'{view.view_id}' AND status = 'ok'")[0][0]
    assert len(slides) == catalog_slides
    # the slide vector is the mean of its tiles' vectors (read from the tile table directly)
    sid = slides.slide_id[0]
    mine = np.stack([np.asarray(v) for v, s in zip(raw.column("vector").to_pylist(), raw.column("slide_id").to_pylist())
                     if s == sid])
    assert np.allclose(np.asarray(slides.vector[0]), mine.mean(axis=0), atol=1e-5)


def test_as_of_reads_a_table_version_and_lineage_names_the_sources(embedded_workspace) -> None:
    ws = histcode.open(embedded_workspace.root)
    view = ws.view()
    lineage = view.lineage()
    assert lineage["encoder"] == view.encoder and lineage["spec_id"] == view.spec_id
    assert lineage["encoder_run_id"] and lineage["spec"]["tile_px"] == ws.config.tiling.tile_px
    assert "first" in lineage["tables"]["tile"]["tags"]  # the fixture tags its materialisation 'first'
    versions = view.versions()
    tagged = [v for v in versions if "first" in v["tags"]]
    assert tagged and len(view.tiles(as_of="first")) == len(view.tiles(as_of=tagged[0]["version"])) > 0
    assert len(view.tiles(as_of=versions[0]["version"])) == 0  # the table as it was created: empty
    with pytest.raises(histcode.HistcodeError, match="no version or tag 'nope'"):
        view.tiles(as_of="nope")


def test_bad_filters_columns_and_views_are_named(embedded_workspace) -> None:
    ws = histcode.open(embedded_workspace.root)
    view = ws.view()
    with pytest.raises(FilterError, match="has no column 'colour'"):
        view.tiles(columns=["tile_id", "colour"])
    with pytest.raises(FilterError, match=r"cannot filter .* by 'no_such_column = 1'.*columns: "):
        view.tiles(where="no_such_column = 1")
    with pytest.raises(ViewError, match="no feature view 'fv-0000000000'"):
        ws.view("fv-0000000000")
    with pytest.raises(ViewError, match="not found in the model registry"):
        ws.view("@no-such-alias")
    with pytest.raises(histcode.UsageError, match="format must be one of"):
        view.tiles(format="excel")
    with pytest.raises(FilterError, match=r"cannot filter .* by 'no_such = 1'"):
        view.nearest(tile_id=view.tiles(columns=["tile_id"]).tile_id[0], where="no_such = 1")
    with pytest.raises(FilterError, match=r"cannot filter .* by 'no_such = 1'"):
        view.similar_slides(view.slides(columns=["slide_id"]).slide_id[0], where="no_such = 1")
    # a quote in an id is quoted, not SQL
    assert len(view.tiles(slide_ids=["O'Brien') OR (1 = 1"])) == 0
    assert issubclass(FilterError, histcode.HistcodeError) and issubclass(ViewError, histcode.HistcodeError)


def test_sql_is_the_cli_sql_and_read_only(embedded_workspace) -> None:
    ws = histcode.open(embedded_workspace.root)
    query = "SELECT slide_id, count(*) AS n FROM tile_embeddings GROUP BY 1 ORDER BY 1"
    mine = ws.sql(query)
    cli = subprocess.run([sys.executable, "-m", "histcode", "-w", str(embedded_workspace.root), "sql", query,
                          "--format", "json"], capture_output=True, text=True, check=True)
    assert mine.to_dict("records") == [json.loads(line) for line in cli.stdout.splitlines()]
    assert isinstance(ws.sql("SELECT count(*) AS n FROM slides", format="arrow"), pa.Table)
    with pytest.raises(ReadOnlyQueryError, match="DROP statements are refused"):
        ws.sql("DROP TABLE slides")
    with pytest.raises(histcode.QueryError, match="BinderException.*no_such_column"):
        ws.sql("SELECT no_such_column FROM slides")


def test_nearest_and_similar_slides_match_an_exact_search(embedded_workspace) -> None:
    ws = histcode.open(embedded_workspace.root)
    view = ws.view()
    raw = view.tiles()
    vectors = np.stack(raw.vector.to_numpy()).astype(np.float64)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = 3
    distance = 1 - unit @ unit[q]
    order = [i for i in np.argsort(distance, kind="stable") if i != q][:5]
    hits = view.nearest(tile_id=raw.tile_id[q], k=5)
    assert list(hits["rank"]) == [1, 2, 3, 4, 5]
    assert np.allclose(hits.distance, distance[order], atol=1e-4)
    by_vector = view.nearest(vector=vectors[q], k=5)
    assert by_vector.tile_id[0] == raw.tile_id[q]  # the tile itself is nearest to its own vector
    one = raw.slide_id[0]
    within = view.nearest(tile_id=raw.tile_id[q], k=3, where=f"slide_id = '{one}'")
    assert set(within.slide_id) <= {one}
    with pytest.raises(histcode.SearchError, match="exactly one of"):
        view.nearest(k=3)
    with pytest.raises(histcode.SearchError, match=f"has {view.dim} values"):
        view.nearest(vector=[0.0, 1.0])

    slides = view.similar_slides(one, k=3)
    assert one not in set(slides.slide_id) and len(slides) == min(3, len(ws.slides()) - 1)
    cli = subprocess.run([sys.executable, "-m", "histcode", "-w", str(embedded_workspace.root), "search", "--slide",
                          one, "--k", "3", "--json"], capture_output=True, text=True, check=True)
    assert list(slides.slide_id) == [json.loads(line)["slide_id"] for line in cli.stdout.splitlines()]


def test_nearest_of_an_image_embeds_it_with_the_views_encoder(embedded_workspace) -> None:
    import openslide
    from PIL import Image

    ws = histcode.open(embedded_workspace.root)
    view = ws.view()
    tile = view.tiles().iloc[0]
    slide = ws.slides().set_index("slide_id").loc[tile.slide_id]
    with openslide.OpenSlide(slide.path) as reader:
        pixels = np.asarray(reader.read_region((int(tile.x), int(tile.y)), 0, (int(tile["size"]),) * 2).convert("RGB"))
    as_array = view.nearest(image=pixels, k=3)
    as_pil = view.nearest(image=Image.fromarray(pixels), k=3)
    assert list(as_array.tile_id) == list(as_pil.tile_id)
    with pytest.raises(histcode.SearchError, match="cannot read query image"):
        view.nearest(image="/no/such.png")


def test_labels_folds_and_bags_are_what_the_heads_train_on(headed_workspace) -> None:
    ws = histcode.open(headed_workspace.root)
    labels = ws.labels()
    assert labels.passed and labels.require_passed() is labels
    current = _catalog_rows(headed_workspace, "SELECT label_version FROM label_sets WHERE is_current")[0][0]
    assert labels.version == current and len(labels.slides) > 0

    folds = ws.folds("tumor")
    stored = dict(_catalog_rows(headed_workspace, "SELECT slide_id, fold FROM cv_folds"))
    assert all(stored[s] == f for s, f in zip(folds.slide_id, folds.fold))
    assert folds.groupby("patient_id").fold.nunique().max() == 1  # a patient never spans folds
    assert set(folds.label) == {"normal", "tumor"}
    subtype = ws.folds("subtype")
    assert set(subtype.label) <= {"LUAD", "LUSC"} and set(subtype.slide_id) <= set(folds.slide_id)
    with pytest.raises(histcode.UsageError, match="unknown task 'mutation'"):
        ws.folds("mutation")

    view = ws.view()
    bags = view.bags("tumor")
    assert isinstance(bags, BagDataset) and len(bags) == len(folds)  # every labelled slide has vectors here
    bag, target, slide_id = bags[0]
    tiles = view.tiles(slide_ids=[slide_id]).sort_values(["y", "x"])
    assert bag.shape == (len(tiles), view.dim)
    assert np.allclose(bag.numpy(), np.stack(tiles.vector.to_numpy()), atol=1e-6)
    tumour = dict(_catalog_rows(headed_workspace, "SELECT slide_id, tumor FROM slide_labels"))
    assert [int(bags[i][1]) for i in range(len(bags))] == [int(bool(tumour[s])) for s in bags.slide_ids]
    assert bags.classes == ("normal", "tumor")
    assert list(bags.frame().fold) == [stored[s] for s in bags.slide_ids]
    train, test = bags.split(0)
    assert len(train) + len(test) == len(bags) and not set(train.patients) & set(test.patients)
    assert set(test.folds) == {0} and 0 not in set(train.folds)
    with pytest.raises(histcode.UsageError, match="already a split around fold 0"):
        train.split(1)
    with pytest.raises(histcode.UsageError, match="fold 9 is not one of"):
        bags.split(9)
    empty = view.versions()[0]["version"]  # the table as it was created, before any vector
    with pytest.raises(histcode.CatalogError, match="no labelled slide has vectors in view"):
        view.bags("tumor", as_of=empty)

    import torch

    loader = torch.utils.data.DataLoader(bags, batch_size=1, shuffle=False)
    first = next(iter(loader))
    assert first[0].shape == (1, *bag.shape)

    de = view.bags("de")
    x, y, _ = de[0]
    assert y.shape == (len(de.genes),) and y.dtype == torch.float32 and de.de_classes.shape == (len(de), len(de.genes))


def test_heads_and_predict_are_the_cli_s(headed_workspace, other_cohort, copy_workspace, tmp_path) -> None:
    from mlflow import MlflowClient

    ws = histcode.open(headed_workspace.root)
    heads = ws.heads()
    client = MlflowClient(tracking_uri=headed_workspace.mlflow_uri, registry_uri=headed_workspace.mlflow_uri)
    best = client.get_model_version_by_alias("histcode-tumor-head", "best")
    row = heads[(heads.task == "tumor") & (heads.version == int(best.version))].iloc[0]
    assert "best" in row.aliases and row.view_id == best.tags["view_id"]
    head = ws.head("tumor")
    probs, attention = head(np.asarray(ws.view(head.view_id).bags("tumor")[0][0]))
    assert probs.shape == (2,) and abs(float(probs.sum()) - 1) < 1e-4
    with pytest.raises(histcode.HeadNotFound, match="run `histcode heads` first"):
        ws.head("tumor", "no-such-alias")

    copy = histcode.open(copy_workspace(headed_workspace).root)
    from histcode.ingest.sources import read_manifest

    slide = read_manifest(other_cohort.manifest)[0].path
    frame = copy.predict([slide])
    assert list(frame.status) == ["ok"] and 0 <= frame.p_tumor[0] <= 1
    with pytest.raises(histcode.HistcodeError, match="no slide files"):
        copy.predict([tmp_path])


def test_load_encoder_takes_a_workspace_a_folder_or_the_default(embedded_workspace, monkeypatch) -> None:
    import torch

    ws = histcode.open(embedded_workspace.root)
    view = ws.view()
    x = torch.rand(2, 3, view._view.image_px, view._view.image_px)
    outputs = []
    monkeypatch.setenv("HISTCODE_HOME", str(embedded_workspace.root))
    for encoder in (histcode.load_encoder(ws, f"@{view.method}"), histcode.load_encoder(str(ws.root)),
                    histcode.load_encoder(), ws.load_encoder(f"histcode-encoder/{view.encoder.rsplit('/', 1)[1]}")):
        assert isinstance(encoder, torch.nn.Module) and not encoder.training
        with torch.no_grad():
            outputs.append(encoder(x))
    assert outputs[0].shape == (2, view.dim)
    assert all(torch.allclose(outputs[0], o) for o in outputs[1:])  # the same registered encoder each time
    with pytest.raises(ViewError, match="not found in the model registry"):
        histcode.load_encoder(ws, "@no-such-alias")


def test_gate_not_passed_is_an_exception_with_the_gates_message(embedded_workspace) -> None:
    ws = histcode.open(embedded_workspace.root)
    assert ws.labels() is None
    with pytest.raises(LabelGateError, match="no labels: run `histcode labels ingest`"):
        ws.folds("tumor")
    with pytest.raises(LabelGateError):
        ws.view().bags("tumor")


def test_conventions_version_module_entry_type_hints_and_extras(embedded_workspace) -> None:
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "histcode", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"histcode {version('histcode')}" == f"histcode {histcode.__version__}"
    assert (Path(histcode.__file__).parent / "py.typed").is_file()
    # a feature whose extra is missing says which extra to install (the module hidden from the interpreter)
    hide = "import sys; sys.modules['{}'] = None; "
    view = subprocess.run([sys.executable, "-c", hide.format("uvicorn") + "sys.argv = ['histcode', '-w', "
                           f"{str(embedded_workspace.root)!r}, 'view']; from histcode.cli import main; main()"],
                          capture_output=True, text=True)
    assert view.returncode == 2 and "pip install 'histcode[viewer]'" in view.stderr, view.stderr
    from histcode.api.frames import convert

    table = histcode.open(embedded_workspace.root).view().slides()
    saved = sys.modules.get("polars")
    sys.modules["polars"] = None  # as if it were not installed
    try:
        with pytest.raises(histcode.MissingExtra, match=r"format='polars' needs polars, which is not installed: "
                                                         r"pip install 'histcode\[polars\]'"):
            convert(table, "polars")
    finally:
        if saved is None:
            del sys.modules["polars"]
        else:
            sys.modules["polars"] = saved


def test_the_cli_prints_any_histcode_error_in_one_line(embedded_workspace) -> None:
    out = subprocess.run([sys.executable, "-m", "histcode", "-w", str(embedded_workspace.root), "search", "--tile",
                          "no-such-tile", "--view", "fv-0000000000"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no feature view 'fv-0000000000'" in out.stderr
