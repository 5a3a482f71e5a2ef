"""The public surface: small, explicit, and matching the stub of the compiled core."""

from __future__ import annotations

import ast
from pathlib import Path

import broker
from broker import _core

ROOT = Path(__file__).resolve().parent.parent


def test_public_names_are_exported_once() -> None:
    tree = ast.parse((ROOT / "broker" / "__init__.py").read_text())
    names = [a.asname for node in tree.body if isinstance(node, ast.ImportFrom)
             for a in node.names if a.asname]
    assert len(names) == len(set(names))
    for name in names:
        assert hasattr(broker, name)


def test_core_stub_matches_the_extension() -> None:
    stub = ast.parse((ROOT / "broker" / "_core.pyi").read_text())
    stubbed: dict[str, set[str]] = {}
    for node in stub.body:
        if isinstance(node, ast.ClassDef):
            stubbed[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)} | {
                n.target.id for n in node.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        elif isinstance(node, ast.FunctionDef):
            stubbed[node.name] = set()
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            stubbed[node.target.id] = set()
    public = {n for n in dir(_core) if not n.startswith("_")}
    assert public == set(stubbed)
    for cls in (_core.Batch, _core.Ring, _core.SparseIndex):
        methods = {n for n in dir(cls) if not n.startswith("_")}
        assert methods == {n for n in stubbed[cls.__name__] if not n.startswith("_")}


def test_the_extension_is_compiled() -> None:
    assert _core.__file__ is not None and _core.__file__.endswith(".so")
