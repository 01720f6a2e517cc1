"""The layering rules (vq_pipeline/*/__init__.py docstrings, DESIGN "Layers"), enforced by scanning imports.

Every import counts, at module level or inside a function ("lazy"); only imports under
``if TYPE_CHECKING:`` do not, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vq_pipeline", "vq_flows")
# Modules that `vq --help`, `vq --version` and `vq inspect` load: they must not import torch or polars.
LIGHT = {
    "vq_pipeline/settings.py",
    "vq_pipeline/io/codebook_file.py",
    "vq_pipeline/io/fileio.py",
    "vq_pipeline/errors.py",
    "vq_pipeline/runtime.py",
    "vq_pipeline/io/paths.py",
    "vq_pipeline/jobs/display.py",
}
# module (top-level import name) -> the only files allowed to import it
OWNERS = {
    "pykeops": {"vq_pipeline/compute/engines/keops.py"},
    "safetensors": {"vq_pipeline/io/codebook_file.py"},
    "sklearn": {"vq_pipeline/sklearn.py"},  # the optional estimator; nothing else needs scikit-learn
    "matplotlib": {"vq_pipeline/jobs/plots.py"},  # the optional pictures
    "polars": {  # the table modules: find, read (whole, or page by page), write
        "vq_pipeline/io/discovery.py",
        "vq_pipeline/io/tables.py",
        "vq_pipeline/io/parquet_pages.py",
        "vq_pipeline/io/table_writer.py",
        "vq_pipeline/arrays.py",  # the caller's polars Series in and out at the public edge
        "vq_pipeline/jobs/semantic_ids.py",  # semantic-id suffixes and collision stats of code tables
        "vq_pipeline/jobs/registry.py",  # the id registry: issued semantic ids, append-only parquet batches
    },
}
# The base modules, below every room: the public edge's validation, settings, errors, array kinds.
BASE = {"vq_pipeline.errors", "vq_pipeline.settings", "vq_pipeline.validate", "vq_pipeline.arrays", "vq_pipeline.runtime"}
# What each room may import from the package (besides itself).
ROOMS = {
    "vq_pipeline.compute": BASE,
    "vq_pipeline.io": BASE,
    "vq_pipeline.codebook": BASE | {"vq_pipeline.compute", "vq_pipeline.io"},
    "vq_pipeline.fitting": BASE | {"vq_pipeline.compute", "vq_pipeline.io", "vq_pipeline.codebook"},
    "vq_pipeline.sklearn": BASE | {"vq_pipeline.compute", "vq_pipeline.codebook", "vq_pipeline.fitting"},
    "vq_pipeline.jobs": BASE | {"vq_pipeline.compute", "vq_pipeline.io", "vq_pipeline.codebook", "vq_pipeline.fitting"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "flows":
        parts[0] = "vq_flows"
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files() -> dict[str, Path]:
    files = [*(ROOT / "vq_pipeline").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]
    return {module_name(p): p for p in files}


def runtime_imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, name or None, line) of every import that can run: at module level or in a function."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for node in ast.walk(block)
    }
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((f"<relative import level {node.level}>", None, node.lineno))
    return found


def imports(path: Path) -> set[str]:
    return {module.split(".")[0] for module, _, _ in runtime_imports(path)}


def package_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from pkg import submodule`` counts as the submodule)."""
    files = package_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for module, item, _ in runtime_imports(path):
            if module.split(".")[0] not in PACKAGES:
                continue
            target = f"{module}.{item}" if f"{module}.{item}" in files else module
            if target != name and target not in PACKAGES:  # the package itself: its lazy public names
                targets.add(target)
        graph[name] = targets
    return graph


def room(module: str) -> str:
    for r in sorted(ROOMS, key=len, reverse=True):
        if module == r or module.startswith(r + "."):
            return r
    return module


def test_import_rules() -> None:
    files = sorted((ROOT / "vq_pipeline").rglob("*.py"))
    assert files
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        found = imports(path)
        assert "prefect" not in found, f"{rel} imports prefect; only flows/ may"
        assert not {"flows", "vq_flows"} & found, f"{rel} imports the application layer (flows/); nothing below it may"
        for module, owners in OWNERS.items():
            assert module not in found or rel in owners, f"{rel} imports {module}; only {sorted(owners)} may"
        if rel in LIGHT:
            assert not {"torch", "polars"} & found, f"{rel} imports {sorted({'torch', 'polars'} & found)}; it must stay light"


def test_no_relative_imports() -> None:
    """Absolute imports only: a module's imports say which room they come from."""
    for name, path in package_files().items():
        relative = [line for module, _, line in runtime_imports(path) if module.startswith("<relative")]
        assert not relative, f"{name} has relative imports at lines {relative}"


def test_rooms_import_only_what_their_docstring_allows() -> None:
    graph = package_graph()
    assert "vq_pipeline.compute.lloyd" in graph and "vq_pipeline.jobs.workdir" in graph
    for module, targets in graph.items():
        r = room(module)
        if r not in ROOMS:
            continue
        allowed = ROOMS[r] | {r}
        for t in targets:
            assert room(t) in allowed or t in allowed, f"{module} imports {t}; the room {r} may import only {sorted(allowed)}"
    for module in (m for m in graph if m.startswith("vq_pipeline.") and room(m) not in ROOMS):
        assert module in BASE, f"{module} belongs to no room; add it to one (or to BASE, below every room)"
    for module in BASE:  # the base imports nothing but the base
        assert graph[module] <= BASE, f"{module} imports {sorted(graph[module] - BASE)}; the base modules import only each other"


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles() -> None:
    """No cycle between modules, lazy or not."""
    assert not find_cycles(package_graph()), f"import cycles: {find_cycles(package_graph())}"


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"d"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_private_name_imported_across_modules() -> None:
    files = package_files()
    for name, path in files.items():
        for module, item, line in runtime_imports(path):
            if module.split(".")[0] in PACKAGES and item and item.startswith("_") and not item.startswith("__"):
                assert module == name, f"{name}:{line} imports the private name {item} from {module}"
