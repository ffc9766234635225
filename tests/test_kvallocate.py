"""KV-cache sensitivity per block and side, and the joint weights + cache allocator (issue 17)."""

from __future__ import annotations

import pytest

from workbench.errors import WorkbenchError
from workbench.measure.kvallocate import allocate_joint, kv_sensitivity
from workbench.measure.sensitivity import sensitivity_scan
from workbench.plan.kv import kv_cache_bytes
from workbench.plan.plan import plan_totals

KW = dict(n_seqs=2, seq_len=64, calib_seqs=8, calib_seq_len=64, progress=False)


@pytest.fixture(scope="module")
def tables(stories, tmp_path_factory):
    import os

    os.environ["WORKBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    w = sensitivity_scan(stories, ["int4_g32", "int8_ch"], "proxy", text="wiki", calibrate=False, **KW)
    kv = kv_sensitivity(stories, ["int2_ch", "int8_ch", "int2_tok", "int8_tok"], tokens=512, seq_len=64)
    return w, kv


def test_kv_sensitivity_orders_bits(tables):
    _, kv = tables
    assert len(kv.cost) == 10  # 5 blocks x (k, v)
    for (block, side), row in kv.cost.items():
        assert row["int2_ch"] > row["int8_ch"] >= 0.0, (block, side, row)
        assert row["int2_tok"] > row["int8_tok"] >= 0.0, (block, side, row)


def test_joint_budget_trades_weights_for_cache(stories, tables):
    w, kv = tables
    context = 4096
    model = stories.model
    layers = w.layers
    D, H = kv.head_dim, kv.n_kv_heads
    blocks = [b for b, _ in kv.cost][::2]
    # weights 0.52 MB in bf16 + a bf16 cache of 5 blocks x 2 x 4,096 tokens x 4 heads x 8 x 2 B = 2.62 MB
    # all of it fits in bf16: only the weight table's bf16 rounding costs remain (~5e-7)
    big = allocate_joint(w, kv, 4.0, context).meta["predicted_cost"]
    assert big < 1e-6
    costs = []
    for mb in (1.6, 1.0, 0.7):  # the smallest plan here: 0.65 MB
        plan = allocate_joint(w, kv, mb, context)
        r = plan.resolve(model)
        total = plan_totals(r, layers).total_bits / 8 + kv_cache_bytes(r.kv, blocks, context, D, H)
        assert total <= mb * 1e6 and abs(total / 1e6 - plan.meta["mb"]) < 1e-9
        assert r.kv, (
            "a 4k-token cache of stories260K is larger than its weights: the allocator must quantize it"
        )
        costs.append(plan.meta["predicted_cost"])
    assert big <= costs[0] <= costs[1] <= costs[2] and costs[2] > 10 * big
    with pytest.raises(WorkbenchError, match="below the smallest plan"):
        allocate_joint(w, kv, 0.01, context)
