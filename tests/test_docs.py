"""The documentation: the MkDocs site builds with --strict (no broken link or anchor, nothing fetched), its API
reference lists every public name of histcode.api, every example notebook is a page, and README.md stays a short
landing page that starts with the two set-up commands and whose links resolve."""

import html
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MKDOCS = Path(sys.executable).parent / "mkdocs"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    assert MKDOCS.is_file(), f"{MKDOCS} is missing: install the docs extra (pip install -e '.[docs]', as make does)"
    out = tmp_path_factory.mktemp("docs") / "site"
    run = subprocess.run([str(MKDOCS), "build", "--strict", "-d", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    return out


def page(site: Path, doc: str) -> str:
    """The built HTML of a docs page given as its source path (``labels.md``, ``examples/own_head.ipynb``)."""
    stem = doc.rsplit(".", 1)[0]
    built = site / ("index.html" if stem == "index" else f"{stem}/index.html")
    assert built.is_file(), f"{doc} was not built ({built} missing)"
    return built.read_text(encoding="utf-8")


def test_the_api_reference_documents_every_public_name(site) -> None:
    api = importlib.import_module("histcode.api")
    reference = page(site, "reference/api.md")
    assert api.__all__, "histcode.api exports nothing"
    missing = [name for name in api.__all__ if f'id="histcode.api.{name}"' not in reference]
    assert not missing, f"the API reference has no entry for histcode.api.{', '.join(missing)}"


def test_every_example_notebook_is_a_page_of_the_site(site) -> None:
    notebooks = sorted((ROOT / "examples").glob("*.ipynb"))
    assert {"own_head", "looking_at_tiles"} <= {nb.stem for nb in notebooks}, notebooks
    home = page(site, "index.md")
    for notebook in notebooks:
        built = page(site, f"examples/{notebook.name}")
        assert '<div class="jupyter-wrapper">' in built, f"{notebook.name} did not render as a notebook"
        assert f'href="examples/{notebook.stem}/"' in home, f"{notebook.name} is not in the site's navigation"
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        title = next(line.lstrip("#").strip() for cell in cells if cell["cell_type"] == "markdown"
                     for line in "".join(cell["source"]).splitlines() if line.startswith("# "))
        text = html.unescape(re.sub(r"<[^>]+>", "", built))
        assert re.sub(r"[`*]", "", title) in text, f"{notebook.name}: its title {title!r} is not on its page"


def test_the_site_loads_nothing_from_font_services(site) -> None:
    for built in site.rglob("*.html"):
        assert "fonts.googleapis.com" not in (text := built.read_text(encoding="utf-8")), built
        assert "fonts.gstatic.com" not in text, built


def test_the_readme_is_a_landing_page_that_starts_with_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines: the details belong in docs/"
    fences = [i for i, line in enumerate(lines) if line.startswith("```")]
    assert lines[0].startswith("# ") and fences and fences[0] <= 3, "README.md must open with the set-up commands"
    first_block = [line.strip() for line in lines[fences[0] + 1:fences[1]] if line.strip()]
    assert first_block == ["make demo", "make test"], first_block


def test_every_relative_link_of_the_readme_resolves(site) -> None:
    targets = LINK.findall(README.read_text(encoding="utf-8"))
    assert any(t.startswith("docs/") for t in targets), "README.md links into no docs page"
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # an address (https:, mailto:) or a heading of the README itself
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), f"README.md links to {path}, which does not exist"
        if anchor:
            assert path.startswith("docs/") and path.endswith(".md"), f"README.md: an anchor outside docs: {target}"
            built = page(site, path.removeprefix("docs/"))
            assert f'id="{anchor}"' in built, f"README.md links to {target}, which has no such section"
