"""The cache view (issue 17): plan KV specs set from the selectors, predicted size, K/V statistics charts."""

from __future__ import annotations

import panel as pn


def test_cache_view_sets_the_plan_and_sizes_the_cache(stories, tmp_path, monkeypatch):
    from workbench.ui.state import WorkbenchState
    from workbench.ui.views.cache_view import CacheView

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    state = WorkbenchState()
    state.set_model(stories)
    view = CacheView(state=state).panel()
    size = next(p for p in view.select(pn.pane.Markdown) if "wb-kv-size" in p.css_classes)
    # stories260K: 5 blocks x (K + V) x 4,096 tokens x 4 kv heads x head dim 8 x 2 B = 2.62 MB in bf16
    assert "the plan (bf16): 2.62 MB (the same as bf16" in size.object
    # the selectors' choice (int4 keys per channel, int4 values per token, R = 32) is sized before it is set
    assert "with the settings above (K int4_ch_r32 / V int4_tok_r32): " in size.object
    preview = size.object.split("with the settings above")[1].split(": ", 1)[1]
    apply = next(b for b in view.select(pn.widgets.Button) if b.name == "set the plan's KV cache")
    apply.clicks += 1
    assert state.plan.k == "int4_ch_r32" and state.plan.v == "int4_tok_r32" and state.plan.version == 2
    kv = state.plan.resolve(state.layers).kv
    assert len(kv) == 5 and f"the plan (K int4_ch_r32 / V int4_tok_r32): {preview}**" in size.object
    assert "x smaller than bf16, 2.62 MB)" in size.object and "settings above" not in size.object
    vbits = next(w for w in view.select(pn.widgets.Select) if w.name == "value bits")
    vbits.value = "int8"  # a different choice is sized beside the plan's
    assert "with the settings above (K int4_ch_r32 / V int8_tok_r32)" in size.object
    state.undo()
    assert state.plan.k is None and "the plan (bf16)" in size.object
    stats = next(b for b in view.select(pn.widgets.Button) if b.name.startswith("compute K/V statistics"))
    stats.clicks += 1  # a background job
    state.jobs[-1].join()
    assert state.jobs[-1].state == "done" and state.kv_stats is not None
    block = next(w for w in view.select(pn.widgets.Select) if w.name == "attention block")
    assert block.options[0] == "model.layers.0.self_attn"
    bars = next(p for p in view.select(pn.pane.Plotly)).object
    assert len(bars.data[0].y) == 8  # one bar per channel of the head
