"""MkDocs hook: the example notebooks (``examples/*.ipynb`` at the repository root, outside ``docs/``) become pages
under ``examples/`` of the site. They are read where they lie, nothing is copied into the source tree, so a fresh
clone builds as it is and the site always shows the notebooks the tests run."""

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns the .ipynb files it is given into pages
def on_files(files: Files, config) -> Files:
    root = Path(config.config_file_path).parent  # the repository: its examples/ become the site's examples/
    for notebook in sorted((root / "examples").glob("*.ipynb")):
        files.append(File(f"examples/{notebook.name}", src_dir=str(root), dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    return files
