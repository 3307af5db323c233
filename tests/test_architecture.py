"""The shape DESIGN.md promises: imports point down, no private cross-module imports, small
modules, and the adapter tools run without Lightning."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorafit"
MODULES = sorted(SRC.rglob("*.py"))
MAX_LINES = 400


def test_import_contracts_hold():
    """pyproject.toml's import-linter contracts: layers, and no Lightning in the core and tools."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint)], capture_output=True, text=True, cwd=SRC.parents[1], check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_another_modules_private_names(path):
    tree = ast.parse(path.read_text())
    private = [
        f"line {node.lineno}: from {node.module} import {alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorafit")
        for alias in node.names
        if alias.name.startswith("_") and alias.name != "__version__"
    ]
    assert not private, private


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_is_past_the_size_where_it_becomes_a_folder(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_adapter_tools_load_without_lightning_or_torchmetrics():
    code = (
        "import sys, lorafit.cli, lorafit.merge, lorafit.generate, lorafit.multi, lorafit.adapters;"
        "bad = sorted(m for m in ('lightning', 'torchmetrics', 'lorafit.tasks', 'lorafit.train') "
        "if m in sys.modules); print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
