"""The layering rules (README "Layout"), enforced by scanning imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Modules that `vq --help`, `vq --version` and `vq inspect` load: they must not import torch or polars.
LIGHT = {
    "vq_pipeline/settings.py",
    "vq_pipeline/codebook_file.py",
    "vq_pipeline/fileio.py",
    "vq_pipeline/errors.py",
    "vq_pipeline/paths.py",
    "vq_pipeline/display.py",
}
# module (top-level import name) -> the only files allowed to import it
OWNERS = {
    "pykeops": {"vq_pipeline/engines/keops.py"},
    "safetensors": {"vq_pipeline/codebook_file.py"},
    "sklearn": {"vq_pipeline/sklearn.py"},  # the optional estimator; nothing else needs scikit-learn
    "matplotlib": {"vq_pipeline/plots.py"},  # the optional pictures
    "polars": {  # the table modules: find, read (whole, or page by page), write
        "vq_pipeline/discovery.py",
        "vq_pipeline/tables.py",
        "vq_pipeline/parquet_pages.py",
        "vq_pipeline/table_writer.py",
        "vq_pipeline/arrays.py",  # the caller's polars Series in and out at the public edge
        "vq_pipeline/semantic_ids.py",  # semantic-id suffixes and collision stats of code tables
    },
}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


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
