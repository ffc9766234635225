"""The app's background work driven through the state on stories260K: statistics, sensitivity, allocation,
evaluation (and its failure), chat. Calibration / evaluation use a short TinyStories excerpt so the test
stays fast (the llama2.c tokenizer is pure Python)."""

from __future__ import annotations

import pytest

pytest.importorskip("panel")

from workbench.model.data import load_text  # noqa: E402
from workbench.ui.state import WorkbenchState  # noqa: E402

SPECS = ["int8_ch", "int4_g32", "int3_g32", "int2_g32"]


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "stories_excerpt.txt"
    path.write_text(load_text("tinystories")[:4000])
    return str(path)


@pytest.fixture(scope="module")
def scanned(stories, excerpt, tmp_path_factory):
    """A state with statistics and a proxy sensitivity table (cache in a temp folder)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    s = WorkbenchState()
    s.set_model(stories)
    job = s.compute_sensitivity(SPECS, wait=True, text=excerpt, calib_seqs=8, calib_seq_len=64)
    assert job.state == "done", job.error
    yield s
    mp.undo()


def test_sensitivity_prices_the_plan_and_orders_bits(scanned):
    s = scanned
    t = s.sensitivity
    assert t.complete and t.specs == SPECS and len(t.layers) == 36
    for x in t.layers:  # fewer bits never cost less on the same layer (RTN, same group size)
        c = t.cost[x.name]
        assert c["int4_g32"] <= c["int3_g32"] <= c["int2_g32"], x.name
    assert s.cost is not None and s.cost.total == 0.0  # all bf16
    s.set_default("int4_g32")
    assert s.cost.total == pytest.approx(sum(t.cost[x.name]["int4_g32"] for x in t.layers))
    assert not s.table["cost"].isna().any()


def test_allocation_meets_the_budget_keeps_pins_and_undoes(scanned):
    s = scanned
    s.set_default("bf16")
    s.set_layer_spec("lm_head", "int8_ch")
    s.set_pinned("lm_head", True)
    assert s.allocate(budget_bits=4.0)
    assert s.totals.avg_bits <= 4.0 + 1e-9
    assert str(s.resolved["lm_head"]) == "int8_ch"
    alloc_cost, alloc_bits = s.cost.total, s.totals.total_bits
    # the exact allocator is no worse than a uniform plan of no larger size (same pin)
    s.set_rule("re:model\\.layers\\..*", "int2_g32")
    assert str(s.resolved["lm_head"]) == "int8_ch"
    assert s.totals.avg_bits <= 4.0 and alloc_cost <= s.cost.total
    assert s.undo() and s.totals.total_bits == alloc_bits  # back to the allocated plan
    assert not s.allocate(budget_bits=0.5)  # impossible: explained, plan kept
    assert "below the smallest plan" in s.message and s.totals.total_bits == alloc_bits


def test_statistics_feed_the_distributions(scanned, excerpt):
    s = scanned
    job = s.compute_stats(wait=True, text=excerpt, n_seqs=4, seq_len=64)
    assert job.state == "done", job.error
    s.selected = "model.layers.0.mlp.down_proj"
    s.grid_spec = "int4_g32"
    s.request_details(wait=True)
    r = s.details
    assert r.name == s.selected and r.activations is not None and r.activations.absmax.shape == (172,)
    assert r.grid.levels.numel() == 16
    assert all(e.output_error is not None for e in r.errors)


def test_evaluation_accumulates_and_a_failure_keeps_the_plan(scanned, excerpt):
    s = scanned
    s.set_default("int4_g32")
    plan = s.plan_json()
    job = s.evaluate(wait=True, text=excerpt, seq_len=64, max_tokens=512)
    assert job.state == "done", job.error
    row = s.evaluations[-1]
    assert row["KL (nats)"] > 0 and 0 < row["top-1"] <= 1 and row["ppl"] > 1
    bad = s.evaluate(wait=True, text=excerpt, seq_len=4096, max_tokens=512)  # longer than the context
    assert bad.state == "failed" and "4096" in s.message and "plan is unchanged" in s.message
    assert s.plan_json() == plan and len(s.evaluations) == 1


def test_chat_runs_reference_and_quantized(scanned):
    s = scanned
    s.set_default("int8_ch")
    job = s.chat("Once upon a time", max_new_tokens=12, wait=True)
    assert job.state == "done", job.error
    r = s.chat_log[-1]
    assert r["reference"] and r["quantized"] and r["quantized_layers"] == 36
    assert r["device"] == "cpu" and "no CUDA" in r["note"]
    assert r["q_cache_bytes"] == r["ref_cache_bytes"] > 0 and not r["kv_note"]  # no K/V specs: same cache
    assert s.set_kv("int8_ch", "int4_tok")  # the plan's cache specs reach the chat's decoder
    job = s.chat("Once upon a time", max_new_tokens=12, wait=True)
    assert job.state == "done", job.error
    r = s.chat_log[-1]
    assert "quantized KV cache in 5 of 5 blocks" in r["kv_note"]
    assert 0 < r["q_cache_bytes"] < 0.6 * r["ref_cache_bytes"]  # 64 slots of stories260K: 42,880 vs 81,920 B


def test_verify_puts_measured_points_beside_the_prediction(scanned, excerpt):
    from workbench.ui import charts

    s = scanned
    assert s.sensitivity.method == "fisher"  # the app's default method
    s.set_default("bf16")
    assert s.allocate(budget_bits=4.5)
    job = s.verify(wait=True, text=excerpt, seq_len=64, max_tokens=512)
    assert job.state == "done", job.error
    v = s.verification
    assert v.rows[0].label == "this plan" and v.rows[0].avg_bits == pytest.approx(s.totals.avg_bits)
    assert v.plan.predicted == pytest.approx(s.cost.total)
    assert any(r.kind == "uniform" and r.fits for r in v.rows) and "verified" in s.message
    from workbench.ui.views.sensitivity_view import SensitivityView

    panel = SensitivityView(state=s).panel()
    verdict = [x for x in panel.objects if "wb-verdict" in (x.css_classes or [])][0]
    assert verdict.object.startswith("**Verified on") and "| this plan |" in verdict.object
    fig = charts.pareto_figure([1.0, 2.0], [0.2, 0.1], checks=[r.__dict__ for r in v.rows])
    measured = next(t for t in fig.data if t.name == "measured KL")
    assert list(measured.y) == [r.kl for r in v.rows]
