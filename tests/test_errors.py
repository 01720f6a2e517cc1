"""The one exception tree: every exception class lives in vq_pipeline.errors, under VQError, exported,
and drawn in the module's docstring; nothing raises a bare built-in error on purpose."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import vq_flows

import vq_pipeline
from vq_pipeline import errors

ROOT = Path(__file__).resolve().parents[1]
# AssertionError stays allowed for "cannot happen" guards: it reports a bug, not an input.
BARE = {"ValueError", "RuntimeError", "TypeError", "KeyError", "Exception"}


def all_modules() -> list[str]:
    names = []
    for package in (vq_pipeline, vq_flows):
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return names


def test_every_exception_class_is_in_the_tree_and_exported() -> None:
    found = {}
    for name in all_modules():
        module = importlib.import_module(name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == name:
                found[value.__qualname__] = name
    outside = {cls: module for cls, module in found.items() if module != "vq_pipeline.errors"}
    assert not outside, f"exception classes defined outside vq_pipeline/errors.py: {outside}"
    tree = {n for n, v in vars(errors).items() if inspect.isclass(v) and issubclass(v, BaseException)}
    assert tree == set(found) and len(tree) >= 10
    assert all(issubclass(getattr(errors, n), errors.VQError) for n in tree)
    assert set(errors.__all__) == tree and tree <= set(vq_pipeline.__all__)
    assert all(getattr(vq_pipeline, n) is getattr(errors, n) for n in tree)
    drawn = errors.__doc__ or ""
    assert all(f" {n} " in drawn for n in tree), "the docstring draws every class of the tree"


def test_nothing_raises_a_bare_builtin_error() -> None:
    bare = []
    for folder in ("vq_pipeline", "flows"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                    if node.exc.func.id in BARE:
                        bare.append(f"{path.relative_to(ROOT)}:{node.lineno} raises {node.exc.func.id}")
    assert not bare, bare
