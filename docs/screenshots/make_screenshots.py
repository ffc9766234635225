"""Regenerate the screenshots of every app view on the default model (docs/screenshots/*.png).

    python docs/screenshots/make_screenshots.py [--model default] [--out docs/screenshots]
    python docs/screenshots/make_screenshots.py --views trust [--budget 4.0]

Serves the app in this process, drives the heavy steps (statistics, sensitivity, allocation, evaluation,
chat) through the session's state object, and photographs each tab with Chromium. `--views trust` takes
only the plans-you-can-trust pictures: the model table sorted by its weight-kurtosis column after the
statistics (model_outliers.png), and the Sensitivity tab after the default scan, an allocation and
"verify current plan" (verify.png: measured points beside the predicted front, the verdict table).
"""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main() -> None:
    import panel as pn
    from playwright.sync_api import sync_playwright

    from workbench.ui.app import _extension, create_app

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default=str(Path(__file__).parent))
    ap.add_argument("--layer", default="model.layers.3.self_attn.q_proj")
    ap.add_argument("--views", choices=["all", "trust"], default="all")
    ap.add_argument("--budget", type=float, default=4.0, help="--views trust: the allocation's bits/weight")
    args = ap.parse_args()
    out = Path(args.out)
    states = []

    def session():
        app = create_app(source=args.model)
        states.append(app.state)
        return app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _extension()
    server = pn.serve(
        {"/": session},
        port=port,
        address="127.0.0.1",
        show=False,
        threaded=True,
        websocket_origin=[f"127.0.0.1:{port}"],
    )

    def ui(fn):
        """Run a state edit on the session's event loop (as a browser click would) and wait for it."""
        import threading

        done = threading.Event()
        states[-1].run_ui(lambda: (fn(), done.set()))
        assert done.wait(120), "the UI thread did not run the edit"

    def step(what, job):
        t0 = time.perf_counter()
        job.join()
        print(f"{what}: {job.state} in {time.perf_counter() - t0:.1f} s {job.error}", flush=True)

    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector(".wb-layer-table .tabulator-row", timeout=600_000)
            st = states[-1]

            def tab(name, settle=3.0, full=True):
                page.locator(".bk-tab", has_text=name).first.click()
                time.sleep(settle)
                page.screenshot(path=str(out / f"{name.lower()}.png"), full_page=full)

            jobs = []
            if args.views == "trust":
                trust_views(page, st, ui, step, out, args.budget)
                b.close()
                return
            ui(lambda: jobs.append(st.compute_stats()))
            step("statistics", jobs[-1])
            specs = ["int8_ch", "int4_g128", "int4_g32", "nf4_g64", "mxfp4", "int3_g64", "int2_g32"]
            ui(lambda: jobs.append(st.compute_sensitivity(specs)))
            step("sensitivity", jobs[-1])
            ui(lambda: st.set_layer_spec("lm_head", "int8_ch"))
            ui(lambda: st.set_pinned("lm_head", True))
            ui(lambda: st.allocate(budget_bits=4.5))
            ui(lambda: st.set_role_spec("down", "int8_ch"))
            time.sleep(2)
            page.screenshot(path=str(out / "model.png"))
            tab("Plan")
            ui(lambda: setattr(st, "selected", args.layer))
            tab("Distributions", settle=1.0)
            page.wait_for_selector(".wb-chart-act .main-svg", timeout=120_000)
            time.sleep(8)
            page.screenshot(path=str(out / "distributions.png"), full_page=True)
            tab("Sensitivity", settle=6.0)
            ui(lambda: jobs.append(st.evaluate(reference=True)))
            step("evaluate reference", jobs[-1])
            ui(lambda: jobs.append(st.evaluate()))
            step("evaluate plan", jobs[-1])
            tab("Measure")
            ui(lambda: jobs.append(st.chat("What is the capital of France?", 32)))
            step("chat", jobs[-1])
            tab("Chat")
            b.close()
    finally:
        server.stop()


def trust_views(page, st, ui, step, out: Path, budget: float) -> None:
    """model_outliers.png (the layer table sorted by weight kurtosis, statistics computed) and verify.png
    (default scan, allocation at `budget` bits/weight, verify)."""
    jobs = []
    ui(lambda: jobs.append(st.compute_stats()))
    step("statistics", jobs[-1])
    cell = page.locator('.wb-layer-table .tabulator-row [tabulator-field="act outlier"]').first
    for _ in range(600):  # until the state adopted the statistics and the table shows the ratios
        if st.inspection is not None and cell.inner_text().strip() not in ("", "-"):
            break
        time.sleep(0.2)
    time.sleep(1)
    header = page.locator(".wb-layer-table .tabulator-col", has_text="kurtosis").first
    header.click()
    header.click()  # descending: the heaviest-tailed layers first
    time.sleep(1)
    page.locator(".wb-layer-table").first.screenshot(path=str(out / "model_outliers.png"))
    ui(lambda: jobs.append(st.compute_sensitivity()))
    step("sensitivity", jobs[-1])
    ui(lambda: st.allocate(budget_bits=budget))
    page.locator(".bk-tab", has_text="Sensitivity").first.click()
    ui(lambda: jobs.append(st.verify()))
    step("verify", jobs[-1])
    page.wait_for_selector(".wb-verdict table", timeout=120_000)
    time.sleep(4)
    top = page.locator(".wb-pareto").first.bounding_box()
    bottom = page.locator(".wb-verdict").first.bounding_box()
    clip = {
        "x": 0,
        "y": top["y"] - 120,
        "width": 1400,
        "height": bottom["y"] + bottom["height"] - top["y"] + 220,
    }
    page.screenshot(path=str(out / "verify.png"), full_page=True, clip=clip)


if __name__ == "__main__":
    main()
