"""workbench.teaching.plans on stories260K: sensitivity tables in long form, plan points vs the allocator,
layer timings of an original vs a quantized layer."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.model.inventory import get_linear_weight
from workbench.quant.api import fake_quant
from workbench.quant.spec import QuantSpec
from workbench.teaching import plans as teaching_plans

DOWN = "model.layers.2.mlp.down_proj"  # [64, 172]


@pytest.fixture(scope="module")
def W(stories) -> torch.Tensor:
    return get_linear_weight(stories.model.get_submodule(DOWN)).detach().float().clone()


# ------------------------------------------------------------------------------------------ plans
@pytest.fixture(scope="module")
def proxy_table(stories, tmp_path_factory):
    from workbench.measure.sensitivity import sensitivity_scan

    from .conftest import DATA

    text = tmp_path_factory.mktemp("teach") / "stories.txt"
    text.write_text((DATA / "calibration" / "tinystories.txt").read_text()[:4000])
    with pytest.MonkeyPatch.context() as mp:  # Gram cache in a temporary folder
        mp.setenv("WORKBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        return sensitivity_scan(
            stories,
            ["int3_g32", "int4_g32", "int8_ch"],
            "proxy",
            text=str(text),
            calib_seqs=4,
            calib_seq_len=64,
            progress=False,
        )


def test_sensitivity_rows_are_the_table_in_long_form(proxy_table):
    rows = teaching_plans.sensitivity_rows(proxy_table)
    assert len(rows) == len(proxy_table.layers) * 3
    for r in rows:
        assert r["cost"] == proxy_table.cost[r["layer"]][r["spec"]]
    head = next(r for r in rows if r["layer"] == "lm_head" and r["spec"] == "int4_g32")
    assert head["block"] == -1 and head["role"] == "lm_head"
    assert (
        head["bits_per_weight"]
        == QuantSpec.parse("int4_g32").bits_per_weight(out_features=512, in_features=64)
        == 5.0
    )


def test_plan_points_add_up_and_the_allocator_beats_uniform(proxy_table):
    from workbench.plan.allocate import allocate_table
    from workbench.plan.plan import plan_totals

    layers = proxy_table.layers
    u8 = teaching_plans.plan_point(proxy_table, {x.name: "int8_ch" for x in layers}, "u8")
    assert u8["cost"] == pytest.approx(sum(proxy_table.cost[x.name]["int8_ch"] for x in layers), rel=1e-12)
    assert u8["mb"] == plan_totals({x.name: QuantSpec.parse("int8_ch") for x in layers}, layers).mb
    pts = teaching_plans.uniform_points(proxy_table)
    assert [p["plan"] for p in pts][-1] == "uniform bf16" and pts[-1]["cost"] == 0.0
    assert [p["mb"] for p in pts] == sorted(p["mb"] for p in pts)
    u4 = next(p for p in pts if p["plan"] == "uniform int4_g32")
    alloc = allocate_table(proxy_table, budget_mb=u4["mb"])
    best = teaching_plans.plan_point(proxy_table, alloc.resolved, "alloc")
    assert best["cost"] == pytest.approx(alloc.predicted_cost, rel=1e-9)
    assert best["cost"] <= u4["cost"] and best["mb"] <= u4["mb"] + 1e-9
    with pytest.raises(WorkbenchError, match="no spec for layer"):
        teaching_plans.plan_point(proxy_table, {}, "empty")
    with pytest.raises(WorkbenchError, match="no cost"):
        teaching_plans.plan_point(proxy_table, {x.name: "int2_g32" for x in layers}, "unscanned")


def test_linear_timing_rows_compare_the_same_layer(W):
    from workbench.quant.api import quantize_weight
    from workbench.runtime.qlinear import QuantLinear

    ref = torch.nn.Linear(172, 64, bias=False)
    with torch.no_grad():
        ref.weight.copy_(W)
    q = QuantLinear.from_quantized(quantize_weight(W, "int4_g32"), None, name=DOWN)
    x = torch.randn(3, 172)
    assert torch.allclose(q(x), x @ fake_quant(W, "int4_g32").T, atol=1e-4)  # the same layer, quantized
    assert teaching_plans.time_module(ref, x, reps=3) > 0
    rows = teaching_plans.linear_timing_rows({DOWN: ref}, {DOWN: q}, tokens=(1, 4), reps=3)
    assert [(r["tokens"], r["shape"], r["spec"]) for r in rows] == [
        (1, "64x172", "int4_g32"),
        (4, "64x172", "int4_g32"),
    ]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["reference_us"] / r["quantized_us"])
    with pytest.raises(WorkbenchError):
        teaching_plans.linear_timing_rows({DOWN: ref}, {"other": q})
