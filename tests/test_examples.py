"""The example notebooks (examples/*.ipynb) run end to end on a demo workspace with trained heads, through a
real Jupyter kernel (nbclient), so that they cannot rot: a cell that raises fails the test."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def _run(path: Path, workspace: Path, tmp_path: Path) -> nbformat.NotebookNode:
    """Execute ``path`` with its ``parameters`` cell followed by ``workspace = <workspace>`` (as papermill
    injects parameters), in ``tmp_path``; the executed notebook is saved beside for a failure's post-mortem."""
    book = nbformat.read(path, as_version=4)
    at = next(i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", []))
    book.cells.insert(at + 1, nbformat.v4.new_code_cell(f"workspace = {str(workspace)!r}"))
    client = NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        nbformat.write(book, tmp_path / path.name)
    return book


def _text(book: nbformat.NotebookNode) -> str:
    out = []
    for cell in book.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or "".join(str(v) for k, v in o.get("data", {}).items() if k == "text/plain"))
    return "\n".join(out)


def _images(book: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in book.cells for o in c.get("outputs", []))


def test_there_are_the_two_examples() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"own_head.ipynb", "looking_at_tiles.ipynb"}
    for path in NOTEBOOKS:  # committed without outputs: what the docs render and the tests run is the source
        book = nbformat.read(path, as_version=4)
        assert not any(c.get("outputs") for c in book.cells if c.cell_type == "code"), path.name


@pytest.mark.integration
def test_own_head_fits_on_the_projects_folds_and_logs_to_mlflow(headed_workspace, copy_workspace, tmp_path) -> None:
    from mlflow import MlflowClient

    ws = copy_workspace(headed_workspace)
    book = _run(EXAMPLES / "own_head.ipynb", ws.root, tmp_path)
    text = _text(book)
    assert "logistic regression on mean-pooled vectors, out of fold: AUC" in text
    assert "attention MIL on the bags, out of fold: AUC" in text
    assert "tumor@best" in text and _images(book) >= 1  # the ROC curves
    client = MlflowClient(tracking_uri=ws.mlflow_uri)
    experiment = client.get_experiment_by_name("heads")
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'notebook-logistic-mean'")
    assert len(runs) == 1
    run = runs[0]
    assert 0 <= run.data.metrics["auc"] <= 1 and 0 <= run.data.metrics["mil_auc"] <= 1
    assert run.data.params["view_id"].startswith("fv-")
    assert "roc.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.integration
def test_looking_at_tiles_draws_neighbours_attention_and_the_site_check(headed_workspace, tmp_path) -> None:
    book = _run(EXAMPLES / "looking_at_tiles.ipynb", headed_workspace.root, tmp_path)
    text = _text(book)
    assert "query tile" in text and "tissue:" in text
    assert _images(book) >= 3  # the neighbours' grid, the attention over the slide, the PCA
