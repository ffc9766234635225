"""The app's state object driven without a browser on stories260K: plan edits, undo/redo, totals, files."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("panel")
pytest.importorskip("param")

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.plan.plan import Plan, plan_totals  # noqa: E402
from workbench.quant.spec import QuantSpec  # noqa: E402
from workbench.ui.state import WorkbenchState  # noqa: E402


@pytest.fixture()
def state(stories):
    s = WorkbenchState()
    s.set_model(stories)
    return s


def _bits(state) -> int:
    return state.totals.total_bits


def test_starts_all_bf16_with_exact_totals(state, stories):
    assert state.phase == "ready"
    assert state.plan.default == "bf16" and state.plan.rules == []
    n = sum(x.n_params for x in state.layers)
    assert state.totals.total_bits == 16 * n
    assert state.totals.mb == pytest.approx(state.totals.bf16_mb)
    assert list(state.table["spec"].unique()) == ["bf16"]
    assert len(state.table) == len(state.layers) == 36


def test_layer_edit_changes_totals_by_the_layer_storage_exactly(state):
    layer = next(x for x in state.layers if x.name == "model.layers.2.mlp.down_proj")
    before = _bits(state)
    assert state.set_layer_spec(layer.name, "int4_g32")
    spec = QuantSpec.parse("int4_g32")
    expected = before - 16 * layer.n_params + spec.storage_bits(layer.out_features, layer.in_features)
    assert _bits(state) == expected
    row = state.table.set_index("layer").loc[layer.name]
    assert row["spec"] == "int4_g32"
    assert row["bits"] == pytest.approx(
        spec.bits_per_weight(out_features=layer.out_features, in_features=layer.in_features), abs=1e-3
    )
    # the same totals as the core computes from the saved plan
    again = Plan.from_json(json.loads(state.plan_json()))
    assert plan_totals(again.resolve(state.layers), state.layers).total_bits == expected


def test_edits_apply_and_record_their_latency(state):
    """Ten edits land in the resolved plan; each records its duration (the speed is benchmarked in
    benchmarks/bench_app.py, not asserted here)."""
    names = [x.name for x in state.layers]
    for i, name in enumerate(names[:10]):
        state.edit_seconds = -1.0
        spec = "int8_ch" if i % 2 else "int4_g64"
        state.set_layer_spec(name, spec)
        assert str(state.resolved[name]) == spec
        assert state.edit_seconds >= 0.0
    assert all(str(state.resolved[n]) == "bf16" for n in names[10:])


def test_undo_redo_walks_the_history(state):
    t0 = _bits(state)
    state.set_role_spec("down", "int8_ch")
    t1 = _bits(state)
    state.set_regex_spec(r"model\.layers\.[0-2]\..*", "int4_g32")
    t2 = _bits(state)
    assert t0 > t1 > t2
    assert state.can_undo and not state.can_redo
    assert state.undo() and _bits(state) == t1
    assert state.undo() and _bits(state) == t0 and not state.can_undo
    assert not state.undo()  # nothing left: a warning, no change
    assert _bits(state) == t0
    assert state.redo() and _bits(state) == t1
    state.set_default("int8_ch")  # a new edit clears the redo branch
    assert not state.can_redo


def test_bulk_rule_replaces_overridden_rules(state):
    state.set_layer_spec("model.layers.0.mlp.down_proj", "int4_g32")
    state.set_layer_spec("model.layers.1.mlp.down_proj", "int3_g32")
    assert len(state.plan.rules) == 2
    state.set_role_spec("down", "int8_ch")
    assert [(r.match, r.spec) for r in state.plan.rules] == [("role:down", "int8_ch")]
    downs = state.table[state.table.role == "down"]
    assert set(downs.spec) == {"int8_ch"} and len(downs) == 5


def test_bad_edits_keep_the_plan(state):
    state.set_layer_spec("model.layers.0.self_attn.q_proj", "int4_g32")
    before = state.plan_json()
    assert not state.set_layer_spec("model.layers.0.self_attn.q_proj", "int9_g32")
    assert state.message_kind == "error" and "int9" in state.message
    assert not state.set_regex_spec(r".*nonexistent.*", "int4_g32")
    assert "matches no layer" in state.message
    assert not state.set_regex_spec(r"(unclosed", "int4_g32")
    assert state.plan_json() == before


def test_plan_for_another_model_is_explained_and_refused(state):
    state.set_role_spec("down", "int8_ch")
    before = state.plan_json()
    foreign = {
        "format": "workbench.plan",
        "version": 1,
        "default": "int4_g128",
        "rules": [
            {"match": "model.layers.17.mlp.down_proj", "spec": "int8_ch"},
            {"match": "re:.*attn\\.c_attn", "spec": "int4_g32"},
            {"match": "role:up", "spec": "int4_g64"},
        ],
    }
    assert not state.load_plan_text(json.dumps(foreign), source="smollm2_plan.json")
    msg = state.message
    assert state.message_kind == "error"
    assert "model.layers.17.mlp.down_proj" in msg and "c_attn" in msg and "matches no layer" in msg
    assert "role:up" not in msg  # that rule is fine: only the two dead rules are named
    assert "current plan is kept" in msg
    assert state.plan_json() == before


def test_plan_json_round_trip_with_pins(state):
    state.set_role_spec("gate", "int4_g32")
    state.set_pinned("model.layers.4.mlp.down_proj", True)
    text = state.plan_json()
    bits = _bits(state)
    fresh = WorkbenchState()
    fresh.set_model(state.loaded)
    assert fresh.load_plan_text(text, "saved.json")
    assert _bits(fresh) == bits
    assert fresh.pinned == ["model.layers.4.mlp.down_proj"]
    assert bool(fresh.table.set_index("layer").loc["model.layers.4.mlp.down_proj", "pinned"])


def test_export_llama_cpp_names_every_layer(state):
    state.set_default("int8_ch")
    out = state.export_llama_cpp()
    lines = out.text.split()
    assert len(lines) == len(state.layers)  # one anchored pattern per tensor
    assert "^blk\\.0\\.attn_q\\.weight$=q8_0" in lines
    assert "^blk\\.0\\.ffn_down\\.weight$=f16" in lines  # 172 columns: no 32-block type fits
    assert any("172 columns" in n for n in out.notes)


def test_background_load_reports_progress_and_bad_source_is_explained():
    from tests.conftest import STORIES

    s = WorkbenchState()
    job = s.load(str(STORIES), wait=True)
    assert job.state == "done" and s.phase == "ready" and len(s.layers) == 36
    assert s.description.name == "stories260K"
    bad = WorkbenchState()
    job = bad.load("/nonexistent/model.gguf", wait=True)
    assert job.state == "failed" and bad.phase == "error"
    assert "not found" in bad.message and bad.message_kind == "error"
    # a failed load after a good one: the model stays, the model box shows its source again
    job = s.load("/nonexistent/model.gguf", wait=True)
    assert job.state == "failed" and s.phase == "ready" and s.source == str(STORIES)
    assert bad.source == "default" and "not found" in s.message
    from workbench.ui.views.common import job_status_text

    assert job_status_text(job).startswith("failed: ") and "failed: failed" not in job_status_text(job)
    from workbench.plan.allocate import budget_to_bits

    with pytest.raises(WorkbenchError, match="above 16"):  # a budget above bf16 everywhere is refused
        budget_to_bits(s.layers, budget_bits=20)


def test_notices_keep_a_short_history_and_a_cancel_is_announced():
    import threading

    from workbench.ui.jobs import Job

    s = WorkbenchState()
    for i in range(10):
        s.notify(f"message {i}", "info")
    assert [t for _, _, t in s.notifications] == [f"message {i}" for i in range(2, 10)]
    started = threading.Event()

    def wait(ctx):
        started.set()
        while True:
            ctx.report(None, "waiting")

    job = s.add_job(Job("long job", wait))
    assert started.wait(5)
    job.cancel()
    job.join(5)
    assert job.state == "cancelled" and s.message == "long job: cancelled" and s.message_kind == "warning"
    assert s.notifications[-2][2] == "message 9"  # the previous notice is still listed


def test_default_spec_says_how_many_layers_it_reaches(state):
    assert state.set_role_spec("down", "int8_ch")
    assert state.set_default("int4_g32") and state.message_kind == "warning"
    assert "reaches 31 of 36 layers" in state.message  # 5 down_proj layers are ruled
    assert state.set_rule("re:.*", "int8_ch")  # every layer: the default reaches none
    assert state.set_default("int3_g32") and "reaches 0 of 36" in state.message
    assert set(state.table["spec"]) == {"int8_ch"}


def test_layer_table_has_sortable_outlier_columns(state):
    t = state.table
    assert {"w max/med", "w kurtosis", "act outlier"} <= set(t.columns)
    W = state.loaded.model.get_submodule("model.layers.0.mlp.down_proj").weight.detach().abs()
    row = t[t["layer"] == "model.layers.0.mlp.down_proj"].iloc[0]
    assert row["w max/med"] == pytest.approx(float(W.max() / W.median()), rel=1e-2)
    assert (t["w max/med"] > 1).all() and t["w kurtosis"].notna().all()
    assert t["act outlier"].isna().all()  # no statistics yet: shown as '-'


def test_heatmap_pages_cover_every_layer_once_with_labels_on_top(state):
    from workbench.ui import charts
    from workbench.ui.views.sensitivity_view import block_pages

    pages = block_pages(state.layers, per_page=2)
    assert list(pages) == ["blocks 0-1", "blocks 2-3", "blocks 4-4 + head"]
    for x in state.layers:
        assert sum(p(x) for p in pages.values()) == 1, x.name
    assert list(block_pages(state.layers)) == ["all"]  # 5 blocks: one page
    fig = charts.heatmap_figure(["a", "b"], ["int4_g32"], [[0.1], [0.2]])
    assert fig.layout.xaxis.side == "top"
