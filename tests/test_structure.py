"""The package's shape (docs/ARCHITECTURE.md): which layer may import which, host code without JAX,
small files, imports at module top."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fourd_jax"
MAX_LINES = 500
# Optional heavy imports that may stay inside the function that needs them (each with a comment).
LOCAL_IMPORTS_ALLOWED = {"torch", "transformers", "matplotlib", "av", "pyarrow"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imported(tree: ast.AST) -> list[tuple[ast.stmt, str]]:
    """(statement, imported module) for every import statement of a parsed file."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node, node.module))
    return out


def test_eval_imports_nothing_from_train():
    offenders = [f"{path.relative_to(PACKAGE.parent)} imports {name}"
                 for path in (PACKAGE / "eval").rglob("*.py")
                 for _, name in imported(ast.parse(path.read_text()))
                 if name == "fourd_jax.train" or name.startswith("fourd_jax.train.")]
    assert not offenders, offenders


def test_the_checker_sees_an_import_from_train():
    # The structural checks read every import, also one inside a function.
    tree = ast.parse("def f():\n    from fourd_jax.train import rl\n")
    assert [name for _, name in imported(tree)] == ["fourd_jax.train"]


@pytest.mark.parametrize("module", [
    "fourd_jax.data.records", "fourd_jax.data.tokenizer", "fourd_jax.data.synth", "fourd_jax.data.importers",
    "fourd_jax.data.inspect", "fourd_jax.data.features", "fourd_jax.data.batching", "fourd_jax.data.processor",
    "fourd_jax.data.taxonomy", "fourd_jax.answers", "fourd_jax.train.rewards",
])
def test_host_code_imports_no_jax(module):
    code = f"import sys, {module}; print(sorted(m for m in ('jax', 'flax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loads {out.strip()}"


def test_every_importer_module_is_host_code():
    names = sorted(f"fourd_jax.data.importers.{p.stem}" for p in (PACKAGE / "data" / "importers").glob("*.py")
                   if p.stem != "__init__")
    assert names
    code = f"import sys, {', '.join(names)}; print(sorted(m for m in ('jax', 'flax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_package_file_exceeds_the_limit():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_imports_sit_at_module_top():
    local = []
    for path in modules():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node, name in imported(tree):
            if id(node) not in top and name.split(".")[0] not in LOCAL_IMPORTS_ALLOWED:
                local.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}")
    assert not local, local
