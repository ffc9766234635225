"""Scan -> allocate -> verify in the served app, in a real Chromium (Playwright), on stories260K.

`workbench serve --model stories260K` (the copy shipped in the package) with an empty workbench cache:
the activation statistics fill the model table's activation-outlier column; then the Sensitivity tab's
default scan (fisher, calibrated on measured plans), the Plan tab's allocation at its default budget, and
"verify current plan": the verdict table must name the plan and its uniform neighbours with measured
KLs, the Pareto chart must gain the measured and predicted points, and the verdict must say the
allocation measures no higher KL than the uniform plan that fits. Screenshots go to artifacts/
(git-ignored). Skipped only when Playwright or Chromium is missing.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "artifacts"


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    """A Chromium page on a fresh `workbench serve --model stories260K`; yields (page, server log)."""
    pytest.importorskip(
        "panel", reason="the UI packages are not installed (pip install 'quant-workbench[ui]')"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tmp_path_factory.mktemp("serve_verify")
    log = tmp / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WORKBENCH_CACHE": str(tmp / "cache")}
    cmd = [sys.executable, "-m", "workbench.cli", "serve", "--model", "stories260K", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        _wait_for(
            lambda: proc.poll() is None and _listening(port), bool, 120, lambda: log.read_text()[-2000:]
        )
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.goto(f"http://127.0.0.1:{port}/")
        pg.wait_for_selector(".wb-layer-table .tabulator-row", timeout=120_000)
        yield pg, log
        pg.close()
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_for(fn, pred, timeout: float, why=lambda: ""):
    t0, value = time.time(), None
    while time.time() - t0 < timeout:
        value = fn()
        if pred(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"condition not met after {timeout} s; last value {value!r} {why()}")


def _tab(pg, name: str) -> None:
    pg.locator(".bk-tab", has_text=name).first.click()


def test_scan_allocate_verify(page):
    pg, log = page
    ARTIFACTS.mkdir(exist_ok=True)
    cell = pg.locator('.wb-layer-table .tabulator-row [tabulator-field="act outlier"]').first
    assert cell.inner_text().strip() == "-"  # no statistics yet
    _tab(pg, "Distributions")
    pg.locator(".wb-stats button").first.click()
    _tab(pg, "Model")
    ratio = _wait_for(lambda: cell.inner_text().strip(), lambda t: t not in ("", "-"), 60)
    assert float(ratio) >= 1.0  # the largest input channel's absmax over the median's
    t0 = time.time()
    _tab(pg, "Sensitivity")
    pg.locator(".wb-sensitivity-run button").first.click()
    _wait_for(lambda: log.read_text(), lambda t: re.search(r"job 'sensitivity[^']*' done", t), 120)
    legend = pg.locator(".wb-pareto .legendtext")
    _wait_for(lambda: legend.all_text_contents(), lambda t: "Pareto front" in t, 30)
    t_scan = time.time() - t0

    _tab(pg, "Plan")
    totals = pg.locator(".wb-totals p").first
    before = totals.inner_text()
    assert "16.000 bits/weight" in before
    pg.locator(".wb-allocate button").first.click()  # the default budget, 4.5 bits/weight
    after = _wait_for(lambda: totals.inner_text(), lambda t: t != before, 30)
    bits = float(re.search(r"([\d.]+)\s+bits/weight", after).group(1))
    assert 4.2 < bits <= 4.5, after

    _tab(pg, "Sensitivity")
    t1 = time.time()
    pg.locator(".wb-verify button").first.click()
    verdict = pg.locator(".wb-verdict p, .wb-verdict table")
    text = _wait_for(
        lambda: "\n".join(verdict.all_inner_texts()),
        lambda t: "Verified on" in t,
        120,
        lambda: log.read_text()[-1500:],
    )
    t_verify = time.time() - t1
    assert "this plan" in text and "uniform int4_g128" in text, text
    assert "no higher than every uniform plan that fits" in text, text
    rows = [r.split("\t") for r in text.splitlines() if r.startswith(("this plan", "uniform "))]
    kls = [float(r[4]) for r in rows]  # plan | avg bits | MB | predicted | measured KL | perplexity | top-1
    assert len(kls) == 3 and kls[0] <= kls[1], (kls, text)  # this plan, the uniform plan that fits, the next
    names = _wait_for(lambda: legend.all_text_contents(), lambda t: "measured KL" in t, 30)
    assert {"Pareto front", "predicted", "measured KL", "current plan"} <= set(names), names
    pg.screenshot(path=str(ARTIFACTS / "browser_verify.png"), full_page=True)
    print(f"scan {t_scan:.1f} s, verify {t_verify:.1f} s")
