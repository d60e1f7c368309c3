"""The console scripts of [project.scripts]: each target imports and answers --help, and every
tools/*.py is a shim over one of them (no sys.path games: the package is installed)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
# Not a console script: it drives whole experiments from a checkout (soft/experiments).
NOT_SCRIPTS = {"__init__.py", "reproduce_paper.py"}


def _target(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_script_target_answers_help(name, capsys):
    main = _target(SCRIPTS[name])
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0, f"{name} --help exited {done.value.code}"
    assert "usage:" in capsys.readouterr().out


def _shim_import(path: Path) -> str:
    """'module:main' that a tools/ shim runs; fails on anything but the plain shim."""
    tree = ast.parse(path.read_text())
    imports = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert len(imports) == 1 and [a.name for a in imports[0].names] == ["main"], path
    assert "sys.path" not in path.read_text(), f"{path}: the package is installed, no sys.path"
    return f"{imports[0].module}:main"


def test_every_tool_is_a_shim_over_a_script():
    tools = sorted(p for p in (REPO / "tools").glob("*.py") if p.name not in NOT_SCRIPTS)
    assert tools, "no tools found"
    targets = set(SCRIPTS.values())
    for path in tools:
        assert _shim_import(path) in targets, f"{path.name} runs no [project.scripts] target"


def test_python_m_runs_a_script_module():
    module = SCRIPTS["soft-plan"].partition(":")[0]
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
