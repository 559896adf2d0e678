"""The house's layering (DESIGN.md), read from the source of every module, lazy imports inside functions included:
shards/ is the ground and imports neither stage; preprocess/ and train/ stand beside each other and never import each
other; only the top package `cavmae` composes them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder → the cavmae packages its modules must not import
FORBIDDEN = {"shards": ("cavmae.preprocess", "cavmae.train", "cavmae.cli", "cavmae.predict", "cavmae.settings"),
             "preprocess": ("cavmae.train", "cavmae.cli", "cavmae.predict"),
             "train": ("cavmae.preprocess", "cavmae.cli", "cavmae.predict")}


def imported_names(source: str, package: str) -> list[str]:
    """Every module an `import` or `from ... import` of a module of `package` names (relative ones resolved)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_a_layer_imports_only_what_is_below_or_beside_it(folder):
    modules = sorted((REPO / folder).rglob("*.py"))
    assert modules
    bad = [f"{path.relative_to(REPO)}: {name}" for path in modules for name in imported_names(
               path.read_text(), "cavmae." + path.parent.relative_to(REPO).as_posix().replace("/", "."))
           if name.startswith(FORBIDDEN[folder]) or name.split(".")[0] in ("preprocess", "shards", "train")]
    assert not bad, bad


def test_the_check_sees_lazy_and_relative_imports():
    """The reader above finds an import inside a function and resolves `from ..x import y` (so it can fail)."""
    names = imported_names("def f():\n    from ..train import stage\n    import cavmae.preprocess.cli\n",
                           "cavmae.shards")
    assert "cavmae.train.stage" in names and "cavmae.preprocess.cli" in names
