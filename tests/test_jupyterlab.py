"""The notebooks in a real JupyterLab page (Chromium through Playwright, no network), quick mode.

Starts `jupyter lab` on 127.0.0.1 with a token on a copy of notebooks/ (JupyterLab saves what it runs), opens
each notebook, runs all cells (`notebook:run-all-cells`) with WORKBENCH_QUICK=1 and checks that no cell errs,
the notebook draws plotly figures and every one is drawn (an SVG inside each plotly output), and the summary
cell printed computed numbers (`tests.test_notebooks.check_executed`: this run is the notebooks' execution
test; tests/test_notebooks.py runs them through nbclient only where this one cannot run). Then 01's
explorer: changing its group size redraws its two figures in place (same count, new title). Then 04's
embedded app: Panel's browser code runs offline (inline resources), and a spec edit in its layer table
changes the totals line and the table.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CHROMIUM, REPO
from tests.test_browser import ARTIFACTS, _free_port, _totals, _wait_change, _wait_for
from tests.test_notebooks import check_executed

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
RUN_TIMEOUT_S = 600

_STATE_JS = """(name) => {
  if (!window.jupyterapp) return null;
  const nb = window.jupyterapp.shell.currentWidget;
  if (!nb || !nb.content || !nb.content.model || nb.context.path !== name) return null;
  const cells = nb.content.model.cells;
  const out = {pending: 0, errors: [], plotly: 0, n: cells.length, mimes: [], summary: []};
  for (let i = 0; i < cells.length; i++) {
    const c = cells.get(i);
    if (c.type !== 'code') continue;
    if (!c.executionCount) out.pending++;
    for (let j = 0; j < c.outputs.length; j++) {
      const o = c.outputs.get(j).toJSON();
      if (o.output_type === 'error') out.errors.push([i, o.ename, o.evalue]);
      if (o.data && o.data['application/vnd.plotly.v1+json']) out.plotly++;
      for (const m of Object.keys(o.data || {})) if (!out.mimes.includes(m)) out.mimes.push(m);
      const md = o.data && o.data['text/markdown'];
      if (i === cells.length - 1 && md) out.summary.push(Array.isArray(md) ? md.join('') : md);
    }
  }
  out.status = nb.sessionContext.kernelDisplayStatus;
  return out;
}"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base url, token, log path) of a JupyterLab on a copy of the notebooks."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not found at {CHROMIUM}")
    pytest.importorskip("jupyterlab")
    root = tmp_path_factory.mktemp("lab")
    for nb in NOTEBOOKS:
        shutil.copy(nb, root / nb.name)
    settings = root / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)  # render every cell (no windowing), so every output is in the page
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    news = root / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)  # no network: no news fetching, no update checks
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port, token = _free_port(), secrets.token_hex(16)
    log = root / "lab.log"
    env = {**os.environ, "WORKBENCH_QUICK": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}"]
    cmd += [f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=None"]
    cmd += ["--LabApp.expose_app_in_browser=True", "--allow-root", "--LabApp.extension_manager=readonly"]
    cmd += ["--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    cmd += [f"--LabApp.user_settings_dir={root / 'settings'}", f"--LabApp.workspaces_dir={root / 'ws'}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, f"jupyter lab exited: {log.read_text()[-2000:]}"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", token, log
    finally:
        proc.terminate()
        proc.wait(30)


def _run_notebook(browser, lab, name: str):
    """Open `name`, run all cells, wait until every code cell ran; returns (page, final state)."""
    url, token, log = lab
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(f"{url}/lab/tree/{name}?reset&token={token}")  # reset: no tabs restored from a workspace
    get = lambda: page.evaluate(_STATE_JS, name)  # noqa: E731
    state = _wait_for(get, lambda s: s and s["status"] == "idle", timeout=120)
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    t0 = time.time()
    while time.time() - t0 < RUN_TIMEOUT_S:
        time.sleep(1)
        state = get()
        if state["errors"] or (state["pending"] == 0 and state["status"] == "idle"):
            break
    else:
        page.screenshot(path=str(ARTIFACTS / f"jupyterlab_{Path(name).stem}_timeout.png"))
        pytest.fail(f"{name}: still running after {RUN_TIMEOUT_S} s: {state}")
    print(f"{name}: ran in {time.time() - t0:.0f} s, {state['plotly']} plotly figures")
    assert not state["errors"], f"{name}: cell errors {state['errors']}\n{log.read_text()[-2000:]}"
    check_executed(name, state["mimes"], state["summary"])  # what tests/test_notebooks.py asked of nbclient
    return page, state


def _plotly_drawn(page, expected: int) -> None:
    """Every plotly output of the notebook (`expected` in cell outputs, more inside widgets) holds an SVG."""
    outs = page.locator(".jp-RenderedPlotly")
    n = outs.count()
    assert n >= expected > 0, f"{expected} plotly outputs in the notebook, {n} rendered in the page"
    for i in range(n):
        outs.nth(i).scroll_into_view_if_needed()
        outs.nth(i).locator(".main-svg").first.wait_for(timeout=30_000)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_jupyterlab(browser, lab, path):
    page, state = _run_notebook(browser, lab, path.name)
    try:
        _plotly_drawn(page, state["plotly"])
        if path.stem.startswith("01"):
            _check_explorer(page)
        if path.stem.startswith("04"):
            _check_embedded_app(page)
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"jupyterlab_{path.stem}.png"))
        page.close()


def _check_explorer(page) -> None:
    """01's last widget cell: a group-size change redraws its two figures in place."""
    cell = page.locator(".jp-CodeCell").filter(has=page.locator(".widget-dropdown select")).last
    cell.scroll_into_view_if_needed()
    figs = cell.locator(".js-plotly-plot")
    _wait_for(lambda: figs.count(), lambda n: n == 2)
    total = page.locator(".js-plotly-plot").count()
    title = lambda: cell.locator(".js-plotly-plot .gtitle").last.text_content()  # noqa: E731
    before = title()
    cell.locator(".widget-dropdown select").last.select_option(label="32")
    after, _ = _wait_change(title, before, timeout=30)
    assert "columns" in after and figs.count() == 2, (before, after)
    assert page.locator(".js-plotly-plot").count() == total  # nothing drawn elsewhere


def _check_embedded_app(page) -> None:
    """04's app: rendered (Panel's JS ran offline) and a spec edit updates totals and table."""
    page.locator(".wb-layer-table .tabulator-row").first.wait_for(timeout=60_000)
    row = page.locator(".wb-layer-table .tabulator-row").filter(has_text="model.layers.1.self_attn.q_proj")
    row = row.first
    row.scroll_into_view_if_needed()
    assert row.locator('[tabulator-field="spec"]').inner_text() == "bf16"
    before = _totals(page)
    row.locator('[tabulator-field="spec"]').click()
    page.locator(".tabulator-edit-list-item", has_text="int8_ch").first.click()
    after, seconds = _wait_change(lambda: _totals(page), before, timeout=30)
    _wait_for(lambda: row.locator('[tabulator-field="spec"]').inner_text(), lambda t: t == "int8_ch")
    layer0 = page.locator(".wb-layer-table .tabulator-row").filter(has_text="model.layers.0.self_attn.q_proj")
    assert layer0.first.locator('[tabulator-field="spec"]').inner_text() == "int4_g128"  # set by the notebook
    cost = layer0.first.locator('[tabulator-field="cost"]').inner_text()
    assert float(cost) > 0, cost  # priced by the notebook's table, not NaN
    print(f"04: totals {before!r} -> {after!r} in {seconds:.2f} s")
