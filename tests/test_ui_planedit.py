"""workbench.plan.edit (the editor's plan operations) and the app's background jobs, on stories260K."""

from __future__ import annotations

import threading

import pytest

from workbench.errors import WorkbenchError
from workbench.measure.sensitivity import SensitivityTable
from workbench.plan.edit import predicted_cost, with_default, with_layer_spec, with_rule, without_rule
from workbench.plan.plan import Plan, Rule


@pytest.fixture(scope="module")
def layers(stories):
    from workbench.model.inventory import layer_inventory

    return layer_inventory(stories.model)


def test_with_rule_equals_appending_and_prunes_overridden(layers):
    plan = Plan(
        "int8_ch",
        [
            Rule("model.layers.0.mlp.up_proj", "int4_g32"),
            Rule("role:q", "int3_g32"),
            Rule("re:model\\.layers\\.[01]\\..*", "int6_g64"),
        ],
    )
    new = with_rule(plan, layers, "re:model\\.layers\\.[0-3]\\..*", "int4_g64")
    appended = Plan(plan.default, plan.rules + [Rule("re:model\\.layers\\.[0-3]\\..*", "int4_g64")])
    assert new.resolve(layers) == appended.resolve(layers)
    # the exact-name rule and the blocks-0-1 regex are fully overridden; role:q still acts on block 4
    assert [r.match for r in new.rules] == ["role:q", "re:model\\.layers\\.[0-3]\\..*"]
    assert plan.rules[0].match == "model.layers.0.mlp.up_proj"  # input untouched


def test_with_layer_spec_adds_a_rule_only_when_needed(layers):
    plan = Plan("int4_g64")
    p1 = with_layer_spec(plan, layers, "lm_head", "int8_ch")
    assert [(r.match, r.spec) for r in p1.rules] == [("lm_head", "int8_ch")]
    p2 = with_layer_spec(p1, layers, "lm_head", "int4_g64")  # back to the default: no rule left
    assert p2.rules == []
    p3 = with_layer_spec(p1, layers, "lm_head", "int4_g64_asym:rtn")  # canonical spelling stored
    assert p3.rules == []
    with pytest.raises(WorkbenchError, match="not a quantizable layer"):
        with_layer_spec(plan, layers, "model.embed_tokens", "int8_ch")
    with pytest.raises(WorkbenchError, match="int9"):
        with_layer_spec(plan, layers, "lm_head", "int9_g32")


def test_default_and_rule_removal(layers):
    plan = Plan("bf16", [Rule("role:down", "int8_ch"), Rule("lm_head", "int4_g32")])
    assert with_default(plan, "int4_g128").default == "int4_g128"
    assert [r.match for r in without_rule(plan, 0).rules] == ["lm_head"]
    with pytest.raises(WorkbenchError, match="no rule 3"):
        without_rule(plan, 2)


def test_allocator_meta_is_dropped_after_a_hand_edit(layers):
    plan = Plan(
        "int4_g64", meta={"allocated_by": "workbench.allocate", "predicted_cost": 1.0, "budget_avg_bits": 4.5}
    )
    edited = with_layer_spec(plan, layers, "lm_head", "int8_ch")
    assert "predicted_cost" not in edited.meta and edited.meta["edited_from"] == "workbench.allocate"


def test_predicted_cost_sums_terms_and_refuses_unpriced(layers):
    table = SensitivityTable(
        method="proxy",
        specs=["int4_g32", "int8_ch"],
        layers=layers,
        cost={x.name: {"int4_g32": 0.01 * (i + 1), "int8_ch": 0.001} for i, x in enumerate(layers)},
    )
    resolved = Plan("int4_g32", [Rule("role:down", "int8_ch"), Rule("lm_head", "bf16")]).resolve(layers)
    pc = predicted_cost(table, resolved)
    expected = sum(
        0.001 if x.role == "down" else 0.0 if x.name == "lm_head" else 0.01 * (i + 1)
        for i, x in enumerate(layers)
    )
    assert pc.total == pytest.approx(expected) and pc.unpriced == []
    assert pc.per_layer["lm_head"] == 0.0
    unpriced = predicted_cost(table, Plan("nf4_g64").resolve(layers))
    assert unpriced.total is None and len(unpriced.unpriced) == len(layers)


def test_job_progress_result_and_cancel():
    from workbench.ui.jobs import Job

    got = []
    job = Job(
        "sum", lambda ctx: [ctx.report(i / 4, f"step {i}") or i for i in range(5)][-1], on_done=got.append
    )
    job.start().join(5)
    assert job.state == "done" and got == [4] and job.progress == 1.0

    started = threading.Event()

    release, adopted = threading.Event(), []

    def step(ctx):  # a step without progress reports runs to its end, then its result is dropped
        started.set()
        release.wait(5)
        return 42

    job = Job("step", step, on_done=adopted.append)
    job.start()
    assert started.wait(5)
    job.cancel()
    assert job.running and job.status == "cancelling"
    release.set()
    job.join(5)
    assert job.state == "cancelled" and job.result is None and adopted == [], job.status

    def boom(ctx):
        raise WorkbenchError("layer x: bad")

    errors = []
    job = Job("boom", boom, on_error=errors.append)
    job.start().join(5)
    assert job.state == "failed" and errors == ["layer x: bad"]
