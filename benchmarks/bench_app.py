"""App timings: `workbench serve` start to interactive (cold and warm model cache), and plan-edit latency.

    python benchmarks/bench_app.py [--model default] [--cold] [--edits 20] [--shots docs/screenshots]

start -> interactive: from launching `workbench serve` (a new process) until Chromium shows the first row
of the layer table. `--cold` points WORKBENCH_CACHE at an empty folder, so the default model's GGUF is
converted again (the shared cache is left alone). Edit latency is measured twice: in the state object
(resolve + totals + layer table, `WorkbenchState.edit_seconds`) and in the browser (click on a spec in the
table editor -> the totals line shows the new size). `--shots` also saves one screenshot per tab.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_edit_latency(model: str, n: int) -> list[float]:
    """Seconds per `set_layer_spec` (resolve + totals + table) on the state object, no browser."""
    from workbench.model.loading import load_model
    from workbench.ui.state import WorkbenchState

    s = WorkbenchState()
    s.set_model(load_model(model, progress=False))
    names = [x.name for x in s.layers]
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        s.set_layer_spec(names[(7 * i) % len(names)], "int4_g64" if i % 2 else "int8_ch")
        out.append(time.perf_counter() - t0)
    return out


def browser_run(model: str, cold: bool, n_edits: int, shots: Path | None) -> dict:
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tmp = None
    if cold:
        tmp = tempfile.TemporaryDirectory(prefix="wb-cold-")
        env["WORKBENCH_CACHE"] = tmp.name
    log = open(Path(tempfile.gettempdir()) / f"bench_app_{port}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "serve", "--model", model, "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    res: dict = {"model": model, "cold": cold}
    try:
        while True:
            assert proc.poll() is None, "server exited"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        res["listening_s"] = time.perf_counter() - t0
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector(".wb-layer-table .tabulator-row", timeout=600_000)
            res["interactive_s"] = time.perf_counter() - t0
            if shots:
                shots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shots / "model.png"))
            totals = lambda: page.locator(".wb-totals p").first.inner_text()  # noqa: E731
            rows = page.locator(".wb-layer-table .tabulator-row")
            lat = []
            for i in range(n_edits):
                before = totals()
                rows.nth(i % 7).locator('[tabulator-field="spec"]').click()
                spec = "int4_g64" if i % 2 == 0 else "int8_ch"
                item = page.locator(".tabulator-edit-list-item", has_text=spec).first
                item.wait_for()
                t1 = time.perf_counter()
                item.click()
                while True:
                    now = totals()
                    if now and now != before:
                        break
                    time.sleep(0.005)
                lat.append(time.perf_counter() - t1)
            res["browser_edit_s"] = lat
            b.close()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        if tmp is not None:
            tmp.cleanup()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--cold", action="store_true", help="also measure with an empty model cache")
    ap.add_argument("--edits", type=int, default=10)
    ap.add_argument("--shots", default=None)
    args = ap.parse_args()
    runs = []
    if args.cold:
        runs.append(browser_run(args.model, True, 0, None))
    runs.append(browser_run(args.model, False, args.edits, Path(args.shots) if args.shots else None))
    state = state_edit_latency(args.model, 20)
    print(f"model: {args.model}   (CPU cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})")
    print(f"{'cache':6s} {'server listening (s)':>21s} {'start -> interactive (s)':>25s}")
    for r in runs:
        print(f"{'cold' if r['cold'] else 'warm':6s} {r['listening_s']:21.2f} {r['interactive_s']:25.2f}")
    lat = runs[-1].get("browser_edit_s", [])
    if lat:
        print(
            f"plan edit, browser click -> totals shown: median {1000 * statistics.median(lat):.0f} ms, "
            f"max {1000 * max(lat):.0f} ms over {len(lat)} edits"
        )
    print(
        f"plan edit, state (resolve + totals + table): median {1000 * statistics.median(state):.1f} ms, "
        f"max {1000 * max(state):.1f} ms over {len(state)} edits"
    )


if __name__ == "__main__":
    main()
