"""The package's layers point one way (docs/architecture.md): a module imports its own package or a lower
layer, never a higher one; packages side by side in a layer do not import each other; no import cycles.

The import graph is read from the source (AST), so the test also sees imports inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import histcode

PACKAGE = Path(histcode.__file__).parent

# Lowest first. Every top-level module or subpackage of histcode must be listed.
LAYERS: list[set[str]] = [
    {"__init__", "config", "workspace", "runtime", "errors"},  # foundation: typed config, paths, devices/workers/seeds, errors
    {"wsi", "store", "tracking", "services"},  # pixels; persistence (DuckDB, LanceDB, small files); MLflow; local servers
    {"ingest", "tiling", "viz"},  # slides into the catalog, tiles; pictures over pixels
    {"ssl"},  # contrastive pretraining
    {"features", "labels"},  # the feature store; expression labels and their gate
    {"heads"},  # models, fitting, CV, metrics, loading a registered head
    {"apps", "api", "demo", "views", "reports", "viewer", "exchange", "doctor"},  # applications; the public Python API;
    # presentation; the viewer; files of other tools in and out; the pre-flight check
    {"cli", "__main__"},  # entry points
]
# Layers whose packages may use each other (applications compose, the foundation is one piece).
SHARED = {0, 6, 7}
# The package's root re-exports the public API (histcode.open, ...), imported on first use: the one upward import.
FACADE = {("histcode", "histcode.api")}


def _layer(unit: str) -> int:
    for i, names in enumerate(LAYERS):
        if unit in names:
            return i
    raise AssertionError(f"histcode.{unit} is in no layer of tests/test_layers.py: add it to LAYERS and to "
                         "docs/architecture.md")


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("histcode"):
                found.add(t)
    return found


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, f, modules) for m, f in modules.items()}


def test_no_module_imports_upward_or_sideways() -> None:
    wrong = []
    for module, targets in _graph().items():
        here = _unit(module)
        for target in targets:
            if (module, target) in FACADE:
                continue
            there = _unit(target)
            if here == there:
                continue
            lh, lt = _layer(here), _layer(there)
            if lt > lh:
                wrong.append(f"{module} -> {target} (layer {lh} imports layer {lt})")
            elif lt == lh and lh not in SHARED:
                wrong.append(f"{module} -> {target} (side by side in layer {lh})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            # a package's __init__ importing its own children is not a cycle of responsibilities
            parent_child = len(component) == 2 and any(a == b.rpartition(".")[0] for a in component for b in component)
            if len(component) > 1 and not parent_child:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_layer_checker_sees_a_violation(tmp_path) -> None:
    """The rule is live: an upward import written into a copy of a module is reported."""
    modules = _modules()
    fake = tmp_path / "histcode" / "store" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from histcode.apps.train_heads import train_heads\n")
    found = _imports("histcode.store.bad", fake, modules)
    assert "histcode.apps.train_heads" in found and _layer(_unit("histcode.apps.train_heads")) > _layer("store")


def test_loading_a_head_does_not_pull_in_training_labels_or_plotting() -> None:
    probe = ("import sys, histcode.heads.apply; "
             "print(sorted(m for m in ('histcode.apps.train_heads', 'histcode.labels.run', 'histcode.heads.cv', "
             "'histcode.viz.plots', 'matplotlib', 'great_expectations') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
