"""Bench scripts run directly: ``python bench/NAME.py`` from the repository root.

Python puts a script's own folder first on ``sys.path``, so ``bench/store.py`` can shadow the
``store`` package for any bench script that imports the project. These tests run each script
the way the docs show, without starting a benchmark.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    path.name for path in (ROOT / "bench").glob("*.py") if "argparse" in path.read_text()
)
PROJECT_PACKAGES = ("bench", "service", "store", "tests", "workers")

# Runs the script's module-level code with sys.path as a direct run sets it, without calling
# main(), then imports every project module the script imports anywhere, main() included.
IMPORT_ALL = """
import importlib, runpy, sys
script, modules = sys.argv[1], sys.argv[2:]
sys.path[0] = str(__import__("pathlib").Path(script).resolve().parent)
runpy.run_path(script, run_name="bench_import_check")
for module in modules:
    importlib.import_module(module)
"""


def _project_imports(script: Path) -> list[str]:
    """Return the project modules ``script`` imports, at module level or inside functions."""
    modules = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return sorted(name for name in modules if name.split(".")[0] in PROJECT_PACKAGES)


def test_bench_scripts_found() -> None:
    assert "load.py" in SCRIPTS
    assert "store.py" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_help(name: str) -> None:
    result = subprocess.run(
        [sys.executable, f"bench/{name}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {name}"), result.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_imports_resolve(name: str) -> None:
    modules = _project_imports(ROOT / "bench" / name)
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, f"bench/{name}", *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
