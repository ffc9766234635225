"""Cache view: K / V distributions per attention block, the plan's cache specs, predicted cache size.

All numbers come from the core: `workbench.stats.kv` (statistics), `workbench.plan.edit.with_kv` (through
`WorkbenchState.set_kv`), `workbench.plan.kv.plan_cache_bytes` and `workbench.quant.kvcache` (the grammar).
"""

from __future__ import annotations

import panel as pn

from workbench.errors import WorkbenchError
from workbench.quant.kvcache import kv_spec_string
from workbench.ui import charts
from workbench.ui.views.common import View

_BITS = ["none", "int8", "int4", "int2", "fp8_e4m3"]


class CacheView(View):
    """K / V statistics of the loaded model and the plan's KV-cache specs (KIVI layout by default)."""

    def _spec_rows(self) -> tuple[pn.Row, pn.Row]:
        """The cache-spec selectors with their 'set' button, and the context with the predicted size."""
        state = self.state
        kbits = pn.widgets.Select(name="key bits", options=_BITS, value="int4", width=110)
        vbits = pn.widgets.Select(name="value bits", options=_BITS, value="int4", width=110)
        kaxis = pn.widgets.Select(name="keys per", options=["ch", "tok"], value="ch", width=90)
        resid = pn.widgets.IntInput(name="recent tokens kept (R)", value=32, start=0, step=16, width=160)
        had = pn.widgets.Checkbox(name="Hadamard keys", value=False)
        pre = pn.widgets.Checkbox(name="pre-RoPE keys", value=False)
        context = pn.widgets.IntInput(name="context (tokens)", value=4096, start=1, step=1024, width=140)
        apply = pn.widgets.Button(
            name="set the plan's KV cache", button_type="primary", align="end", width=200
        )
        size = pn.pane.Markdown("", css_classes=["wb-kv-size"])

        def on_apply(_event):
            k = kv_spec_string(kbits.value, kaxis.value, resid.value, had.value, pre.value)
            v = kv_spec_string(vbits.value, "tok", resid.value)
            state.set_kv(k, v)

        def show_size(*_events):
            k = kv_spec_string(kbits.value, kaxis.value, resid.value, had.value, pre.value)
            v = kv_spec_string(vbits.value, "tok", resid.value)
            size.object = self._size_text(context.value, k, v)

        apply.on_click(on_apply)
        for w in (context, kbits, vbits, kaxis, resid, had, pre):
            w.param.watch(show_size, "value")
        state.param.watch(show_size, ["revision", "loaded"])
        show_size()
        return pn.Row(kbits, kaxis, vbits, resid, had, pre, apply), pn.Row(context, size)

    def _size_text(self, context: int, k: str | None, v: str | None) -> str:
        """KV-cache bytes of one sequence at `context` tokens: the plan's, and the selectors' (k, v) if
        they differ, beside bf16 (markdown)."""
        from workbench.plan.edit import with_kv
        from workbench.plan.kv import plan_cache_bytes

        state = self.state
        if state.loaded is None or state.plan is None:
            return "*no model loaded*"

        def line(plan) -> tuple[str, str]:
            kv = plan.resolve(state.layers).kv
            q, bf = plan_cache_bytes(state.loaded.model, kv, context)
            specs = sorted({f"K {s.to_json()['k']} / V {s.to_json()['v']}" for s in kv.values()})
            ratio = "the same as bf16" if q == bf else f"{bf / max(q, 1):.2f}x smaller than bf16"
            return f"{q / 1e6:.2f} MB ({ratio}, {bf / 1e6:.2f} MB)", "; ".join(specs) or "bf16"

        try:
            now, specs = line(state.plan)
            picked, picked_specs = line(with_kv(state.plan, k, v))
        except WorkbenchError as exc:
            return f"cache size unavailable: {exc}"
        text = f"**KV cache of one sequence at {context:,} tokens, the plan ({specs}): {now}**"
        if picked_specs != specs:
            text += f"  \nwith the settings above ({picked_specs}): {picked}"
        return text

    def _stats_panel(self) -> pn.Column:
        """The K/V statistics button, the block / side / head selectors and the two charts of one head."""
        state = self.state
        block = pn.widgets.Select(name="attention block", options=[], width=300)
        side = pn.widgets.Select(name="side", options=["k_pre", "k_post", "v"], value="k_post", width=100)
        head = pn.widgets.IntInput(name="kv head", value=0, start=0, width=90)
        stats_btn = pn.widgets.Button(name="compute K/V statistics (8 x 256 tokens)", width=280, align="end")
        outliers = pn.pane.Markdown("")
        absmax = pn.pane.Plotly(
            charts.empty_figure("compute the statistics first"), sizing_mode="stretch_width"
        )
        hist = pn.pane.Plotly(charts.empty_figure(""), sizing_mode="stretch_width")

        def adopt(*_events):
            s = state.kv_stats
            if s is None:
                block.options, outliers.object = [], ""
                absmax.object = charts.empty_figure("compute the statistics first")
                return
            block.options = list(s.blocks)
            block.value = block.value if block.value in block.options else block.options[0]
            outliers.object = s.summary(5).replace("\n", "  \n")
            draw()

        def draw(*_events):
            s = state.kv_stats
            if s is not None and block.value:
                _draw_head(s, block.value, side.value, head.value, absmax, hist)

        stats_btn.on_click(lambda _e: state.compute_kv_stats())  # a job: progress bar, the UI stays live
        state.param.watch(adopt, "kv_stats")
        block.param.watch(draw, "value")
        side.param.watch(draw, "value")
        head.param.watch(draw, "value")
        adopt()
        return pn.Column(
            pn.Row(stats_btn, block, side, head),
            outliers,
            pn.Row(absmax, hist, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )

    def panel(self) -> pn.viewable.Viewable:
        specs, size = self._spec_rows()
        return pn.Column(
            pn.pane.Markdown(
                "Keys per channel and values per token with the R most recent tokens in bf16 is KIVI's "
                "layout; a token is quantized once, when it leaves the window (per-channel keys in groups "
                "of 32 tokens)."
            ),
            specs,
            size,
            self._stats_panel(),
            sizing_mode="stretch_width",
            name="Cache",
        )


def _draw_head(s, block: str, side: str, head: int, absmax: pn.pane.Plotly, hist: pn.pane.Plotly) -> None:
    """One head's per-channel absmax (outlier channels marked) and its value histogram (KVStatistics `s`)."""
    d = s.blocks[block][side]
    h = min(head, d["absmax"].shape[0] - 1)
    ratio = s.channel_ratio(block, side, h)
    absmax.object = charts.channel_absmax_figure(
        d["absmax"][h].tolist(), (ratio > 4).tolist(), title=f"{block} {side} head {h}"
    )
    scale = float(d["scale"][0])
    n = d["hist"].numel()
    edges = [scale * (-1 + 2 * i / n) for i in range(n + 1)]
    hist.object = charts.histogram_figure(edges, d["hist"].tolist(), title=f"{side} values", log_y=True)
