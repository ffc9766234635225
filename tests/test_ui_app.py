"""The app object without a browser: the same build for notebooks and `workbench serve`, safe defaults."""

from __future__ import annotations

import pytest

pytest.importorskip("panel")


def test_serve_binds_localhost_by_default():
    from workbench.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 5006 and args.model == "default"
    args = build_parser().parse_args(["serve", "--model", "x.gguf", "--host", "0.0.0.0", "--port", "0"])
    assert (args.host, args.port, args.model) == ("0.0.0.0", 0, "x.gguf")


def test_show_builds_every_view_for_a_loaded_model(stories):
    import panel as pn

    from workbench.ui import show

    app = show(model=stories)
    state = app.state
    assert state.phase == "ready" and len(state.layers) == 36
    tabs = [o for o in app.select(pn.Tabs)]
    assert len(tabs) == 1
    assert list(tabs[0]._names) == [
        "Model",
        "Plan",
        "Distributions",
        "Sensitivity",
        "Transforms",
        "Measure",
        "Cache",
        "Chat",
    ]
    table = next(t for t in app.select(pn.widgets.Tabulator) if "wb-layer-table" in t.css_classes)
    assert len(table.value) == 36
    state.set_role_spec("down", "int8_ch")  # the table widget follows the state
    assert set(table.value[table.value.role == "down"].spec) == {"int8_ch"}
    state.undo()
    assert set(table.value.spec) == {"bf16"}


def test_closing_a_session_cancels_its_jobs(stories):
    import threading

    from workbench.ui.jobs import Job
    from workbench.ui.state import WorkbenchState

    s = WorkbenchState()
    s.set_model(stories)
    started = threading.Event()

    def forever(ctx):
        started.set()
        while True:
            ctx.report(None, "working")

    job = s.add_job(Job("long", forever))
    assert started.wait(5)
    assert s.cancel_jobs() == 1  # what on_session_destroyed calls
    job.join(5)
    assert job.state == "cancelled" and s.running_jobs() == []


def test_views_follow_a_sensitivity_table(stories):
    """Cost and revision change together after a scan: every view's watchers must take both events."""
    import panel as pn

    from workbench.measure.sensitivity import SensitivityTable
    from workbench.ui import show

    app = show(model=stories)
    state = app.state
    table = SensitivityTable(
        method="proxy",
        specs=["int8_ch", "int4_g32"],
        layers=state.layers,
        cost={x.name: {"int8_ch": 1e-4, "int4_g32": 1e-2} for x in state.layers},
    )
    state.sensitivity = table
    state.refresh()
    state.set_default("int4_g32")
    totals = [p for p in app.select(pn.pane.Markdown) if "wb-totals" in p.css_classes]
    assert totals and all("predicted cost: **0.36**" in p.object for p in totals)  # 36 layers x 0.01
    heat = next(p for p in app.select(pn.pane.Plotly) if "wb-heatmap" in p.css_classes)
    assert list(heat.object.data[0].x) == ["int8_ch", "int4_g32"] and len(heat.object.data[0].y) == 36
    assert state.allocate(budget_bits=6.0) and state.totals.avg_bits <= 6.0


def test_the_distributions_view_takes_batched_changes(stories):
    import param

    from workbench.ui.state import WorkbenchState
    from workbench.ui.views.distributions_view import DistributionsView

    s = WorkbenchState()
    s.set_model(stories)
    DistributionsView(state=s).panel()
    name = s.layers[1].name
    with param.parameterized.batch_call_watchers(s):  # one watcher call with two events
        s.selected, s.grid_spec = name, "int4_g32"
    job = s.jobs[-1]
    job.join(30)
    assert job.name == f"layer {name.removeprefix('model.')}" and job.state == "done", job.error
    assert s.details.name == name and s.details.grid_spec == "int4_g32"
