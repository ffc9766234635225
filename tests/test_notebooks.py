"""The notebooks: stored without outputs, no logic of their own, goals first and summary last, and each one
executes top to bottom (WORKBENCH_QUICK=1 so token counts stay small on a CPU).

Execution is checked once per notebook: by tests/test_jupyterlab.py in a real JupyterLab page when that test
runs in the session (selected, with Chromium, Playwright and JupyterLab installed), else here through
nbclient; both hold the outputs to `check_executed`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import time
from pathlib import Path

import pytest

from tests.conftest import CHROMIUM

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = [
    "01_quantization_basics",
    "02_inspect_a_model",
    "03_sensitivity",
    "04_mixed_precision_plan",
    "05_run_on_gpu",
]
MAX_DEF_LINES = 5  # a def / class may span at most this many lines (header included)
CELL_TIMEOUT_S = 300


def _paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _code(cell) -> str:
    """Cell source with IPython magic / shell lines blanked, so `ast` can parse it (line numbers kept)."""
    lines = cell.source.splitlines()
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in lines)


def _defs_too_long(source: str) -> list[str]:
    too_long = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_DEF_LINES:
                too_long.append(f"{node.name} ({n} lines)")
    return too_long


def test_the_five_notebooks_exist():
    assert [p.stem for p in _paths()] == EXPECTED


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    raw = json.loads(path.read_text())
    for i, cell in enumerate(raw["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, (
                f"{path.name} cell {i} has stored outputs: strip them before committing"
            )
    assert "widgets" not in raw["metadata"], f"{path.name} stores widget state"


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.stem)
def test_goals_first_summary_last(path):
    nb = _read(path)
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and "What you will learn" in first.source, (
        f"{path.name}: the first cell must state what the reader will learn"
    )
    assert "## Summary" in last.source, f"{path.name}: the last cell must be the summary"
    # numbers in the summary come from the cells: the summary is a code cell that formats computed values
    assert last.cell_type == "code" and re.search(r"\{[^}]+\}", last.source), (
        f"{path.name}: the summary must be built from computed values (f-string), not typed by hand"
    )


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.stem)
def test_no_logic_in_notebooks(path):
    nb = _read(path)
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        src = _code(cell)
        problems += [f"cell {i}: {d}" for d in _defs_too_long(src)]
    assert not problems, f"{path.name} defines logic (move it into the package with a test): {problems}"
    assert any("import workbench" in c.source or "from workbench" in c.source for c in nb.cells)


def test_the_logic_check_catches_a_long_function():
    src = "def f(x):\n    a = x\n    b = a + 1\n    c = b * 2\n    d = c - 3\n    return d\n"
    assert _defs_too_long(src) == ["f (6 lines)"]
    assert _defs_too_long("def g(change=None):\n    return 1\n") == []
    klass = "class A:\n    x = 1\n    y = 2\n    z = 3\n    w = 4\n    v = 5\n"
    assert _defs_too_long(klass) == ["A (6 lines)"]


def check_executed(name: str, mimes, summaries: list[str]) -> None:
    """What an executed notebook must show: a plotly figure among its outputs (`mimes`: every output's MIME
    types) and computed numbers in the markdown its summary cell printed (`summaries`)."""
    assert "application/vnd.plotly.v1+json" in set(mimes), f"{name} drew no plotly figure"
    printed = summaries[0] if summaries else ""
    assert re.search(r"\d", printed), f"{name}: the summary cell printed no computed numbers"


def test_check_executed_catches_a_missing_figure_or_summary():
    plotly, md = "application/vnd.plotly.v1+json", "text/markdown"
    check_executed("nb", [md, plotly], ["## Summary\n4.25 bits per weight"])
    with pytest.raises(AssertionError, match="no plotly figure"):
        check_executed("nb", [md, "image/png"], ["## Summary\n4.25 bits"])
    with pytest.raises(AssertionError, match="no computed numbers"):
        check_executed("nb", [md, plotly], ["## Summary\nsee above"])
    with pytest.raises(AssertionError, match="no computed numbers"):
        check_executed("nb", [plotly], [])


def _runs_in_jupyterlab(request, stem: str) -> bool:
    """Whether tests/test_jupyterlab.py executes this notebook in this session: selected, and not skipped for
    a missing Chromium, Playwright or JupyterLab (its fixtures' conditions)."""
    selected = any(
        item.name == f"test_notebook_runs_in_jupyterlab[{stem}]" and item.path.name == "test_jupyterlab.py"
        for item in request.session.items
    )
    tools = all(importlib.util.find_spec(m) is not None for m in ("playwright", "jupyterlab"))
    return selected and tools and Path(CHROMIUM).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch, tmp_path, request):
    """Runs every cell with small token counts; no cell may raise; figures and computed prose must appear."""
    if _runs_in_jupyterlab(request, path.stem):
        pytest.skip(f"{path.name} is executed and checked in JupyterLab by tests/test_jupyterlab.py")
    from nbclient import NotebookClient

    monkeypatch.setenv("WORKBENCH_QUICK", "1")
    nb = _read(path)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    t0 = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - t0
    print(f"{path.name}: executed in {seconds:.1f} s")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    mimes = {m for o in outputs for m in o.get("data", {})}
    last = nb.cells[-1].outputs
    summary = [o["data"]["text/markdown"] for o in last if "text/markdown" in o.get("data", {})]
    check_executed(path.name, mimes, summary)
