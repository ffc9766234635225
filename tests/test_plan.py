"""Plans: rule resolution order, validation errors naming every offender, totals, diff, JSON round trip."""

from __future__ import annotations

import json

import pytest

from workbench.errors import WorkbenchError
from workbench.model.inventory import layer_inventory
from workbench.plan.plan import Plan, Rule, plan_diff, plan_totals
from workbench.quant.spec import QuantSpec


@pytest.fixture(scope="module")
def layers(stories):
    return layer_inventory(stories.model)


def test_resolution_later_rules_win(layers):
    plan = Plan(
        default="int4_g32",
        rules=[
            Rule("re:.*mlp\\..*", "int8_ch"),
            Rule("role:down", "int3_g64:gptq"),
            Rule("model.layers.2.mlp.down_proj", "bf16"),
            Rule("lm_head", "nvfp4"),
        ],
    )
    r = plan.resolve(layers)
    assert list(r) == [x.name for x in layers]
    assert str(r["model.layers.0.self_attn.q_proj"]) == "int4_g32"
    assert str(r["model.layers.0.mlp.up_proj"]) == "int8_ch"
    assert str(r["model.layers.1.mlp.down_proj"]) == "int3_g64:gptq"
    assert str(r["model.layers.2.mlp.down_proj"]) == "bf16"
    assert str(r["lm_head"]) == "nvfp4"
    # regex is a full match: "q_proj" alone matches nothing, and that is an error
    with pytest.raises(WorkbenchError, match="rule 1 \\(match 're:q_proj'\\) matches no layer"):
        Plan(default="bf16", rules=[Rule("re:q_proj", "int4_g32")]).resolve(layers)


def test_validation_lists_every_problem(layers):
    plan = Plan(
        default="int4_g32",
        rules=[
            Rule("re:.*nothing_here", "int8_ch"),  # matches nothing
            Rule("role:down", "int9_g32"),  # unknown spec
            Rule("role:attn", "int4_g32"),  # unknown role
            Rule("re:(", "int4_g32"),  # bad regex
            Rule("lm_head", "int4_g64:awq:gptq"),  # unknown algorithm part
        ],
    )
    with pytest.raises(WorkbenchError) as exc:
        plan.validate(layers)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("plan has 5 problems")
    assert "rule 1 (match 're:.*nothing_here') matches no layer" in msg
    assert "rule 2 (match 'role:down')" in msg and "int9" in msg
    assert "rule 3 (match 'role:attn'): unknown role 'attn'" in msg
    assert "rule 4 (match 're:(')" in msg and "bad regex" in msg
    assert "rule 5 (match 'lm_head')" in msg
    with pytest.raises(WorkbenchError, match="default spec 'int4_x'"):
        Plan(default="int4_x").validate(layers)


def test_validation_names_layer_that_cannot_take_spec(layers):
    # check_layer refuses only empty / gigantic shapes; build such a layer to see the layer-level message
    from dataclasses import replace

    bad = replace(layers[0], name="fake.empty", out_features=0, n_params=0)
    with pytest.raises(WorkbenchError, match="layer fake.empty: int4_g32 \\(default\\) cannot apply: empty"):
        Plan(default="int4_g32").validate(layers + [bad])


def test_json_round_trip_and_refusals(layers, tmp_path):
    plan = Plan(
        default="int4_g128",
        rules=[Rule("re:.*down_proj", "int8_ch"), Rule("lm_head", "bf16")],
        meta={"note": "x"},
    )
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again == plan and again.to_json() == plan.to_json()
    assert json.loads(path.read_text())["format"] == "workbench.plan"
    d = plan.to_json()
    with pytest.raises(WorkbenchError, match="plan version 3 is not supported"):
        Plan.from_json({**d, "version": 3})
    with pytest.raises(WorkbenchError, match="not a workbench plan"):
        Plan.from_json({**d, "format": "other"})
    with pytest.raises(WorkbenchError, match="unknown plan key\\(s\\) 'rule'"):
        Plan.from_json({**d, "rule": []})
    with pytest.raises(WorkbenchError, match="rule 1 must be"):
        Plan.from_json({**d, "rules": [{"match": "lm_head"}]})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(WorkbenchError, match="bad.json: invalid JSON at line 1"):
        Plan.load(tmp_path / "bad.json")
    # from_resolved reproduces the resolution exactly
    r = plan.resolve(layers)
    assert Plan.from_resolved(r).resolve(layers) == r


def test_totals_exact(layers):
    r = Plan(default="int4_g32", rules=[Rule("lm_head", "bf16")]).resolve(layers)
    t = plan_totals(r, layers)
    expect = (
        sum(
            QuantSpec.parse("int4_g32").storage_bits(x.out_features, x.in_features)
            for x in layers
            if x.name != "lm_head"
        )
        + 16 * 512 * 64
    )
    assert t.total_bits == expect
    assert t.n_weights == sum(x.n_params for x in layers)  # tied lm_head counted once, embeddings not
    assert t.avg_bits == pytest.approx(expect / t.n_weights)
    assert t.mb == pytest.approx(expect / 8e6) and t.bf16_mb == pytest.approx(16 * t.n_weights / 8e6)
    assert t.by_spec == {"int4_g32": t.n_weights - 512 * 64, "bf16": 512 * 64}
    # a uniform int4_g32 asym plan on rows of 64 = 4 + 32/32 = 5 bits everywhere but the down proj (K=172)
    u = plan_totals(Plan(default="int4_g32").resolve(layers), layers)
    assert 5.0 < u.avg_bits < 5.1


def test_diff(layers):
    a = Plan(default="int4_g32").resolve(layers)
    b = Plan(default="int4_g32", rules=[Rule("role:k", "int8_ch"), Rule("lm_head", "bf16")]).resolve(layers)
    d = plan_diff(a, b)
    assert [c.layer for c in d] == [x.name for x in layers if x.role in ("k", "lm_head")]
    assert (d[0].old, d[0].new) == ("int4_g32", "int8_ch") and (d[-1].old, d[-1].new) == ("int4_g32", "bf16")
    assert plan_diff(a, a) == []


def test_resolve_gives_the_plan_currency(stories, layers):
    from workbench.plan.plan import ResolvedPlan

    plan = Plan(default="int4_g32", rules=[Rule("role:down", "int3_g32:gptq"), Rule("lm_head", "bf16")])
    r = plan.resolve(stories.model)  # a model, a LoadedModel or a list of LayerInfo: the same resolution
    assert isinstance(r, ResolvedPlan) and r == plan.resolve(layers) == plan.resolve(stories)
    assert [x.name for x in r.layers] == [x.name for x in layers] == list(r)
    downs = [x.name for x in layers if x.role == "down"]
    assert r.gram_layers == downs and r.kept == ["lm_head"] and len(r.quantized) == len(layers) - 1
    assert ResolvedPlan.of(stories.model, r) is r  # a resolved plan is never resolved again
    assert ResolvedPlan.of(stories.model, plan) == r


def test_explicit_specs_are_validated_all_at_once(stories):
    from workbench.plan.plan import ResolvedPlan

    r = ResolvedPlan.from_specs(
        stories.model, {"lm_head": "int8_ch", "model.layers.0.mlp.up_proj": "nf4_g64"}
    )
    assert list(r) == ["model.layers.0.mlp.up_proj", "lm_head"]  # inventory order, only the named layers
    assert [x.name for x in r.layers] == list(r)
    with pytest.raises(WorkbenchError, match="2 problems") as info:
        ResolvedPlan.from_specs(
            stories.model, {"model.layers.9.mlp.up_proj": "int4_g32", "lm_head": "int4_x"}
        )
    assert "model.layers.9.mlp.up_proj" in str(info.value) and "unknown part 'x'" in str(info.value)
    with pytest.raises(WorkbenchError, match="Plan.load first"):
        ResolvedPlan.of(stories.model, "plan.json")  # a path is not a plan
