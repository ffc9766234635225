"""Packaging: the kernels folder never shadows the PyPI package `kernels` that transformers probes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROBE = (
    "import importlib.metadata as md, workbench.kernels as k; "
    "from transformers.utils import is_kernels_available as a; "
    "v = None\ntry:\n    v = md.version('kernels')\nexcept md.PackageNotFoundError:\n    pass\n"
    "print(a(), v, list(k.__path__)[0])"
)


def _probe(cwd: Path) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, check=True)
    return r.stdout.split()


def test_kernels_not_importable_as_pypi_kernels(tmp_path):
    """transformers >= 5.2x depends on the PyPI `kernels`, older ones do not: either way the repo root on
    sys.path (where kernels/ is visible as a namespace folder) must not change what transformers sees."""
    outside = _probe(tmp_path)
    inside = _probe(REPO)
    assert outside[:2] == inside[:2]
    assert (outside[0] == "True") == (outside[1] != "None")  # available exactly when it is installed
    assert Path(outside[2]).resolve() == (REPO / "kernels").resolve()
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_cli_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "inspect" in r.stdout


def test_tree_passes_ruff():
    """House style: ruff (pyflakes, pycodestyle, isort rules from pyproject.toml) and ruff-format."""
    ruff = Path(sys.executable).with_name("ruff")
    cmd = [str(ruff)] if ruff.is_file() else [sys.executable, "-m", "ruff"]
    for args in (["check", "--output-format", "concise", "."], ["format", "--check", "."]):
        r = subprocess.run(cmd + args, cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, f"ruff {args[0]}:\n{r.stdout}{r.stderr}"


def test_every_subpackage_ships_in_the_wheel():
    """pyproject's explicit package list names every folder of workbench/ with an __init__.py (an editable
    install finds a forgotten one anyway; a wheel would leave it out)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "workbench").rglob("__init__.py")
    } | {"workbench.kernels"}
    assert found == listed, (
        f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"
    )
