"""Transforms view: a layer's input distribution, kurtosis and max/median before and after a transform.

Layout only: the comparison is computed by `workbench.transform.compare` in a job (`TransformCompare.run`,
ui/transform_state.py) and drawn by `ui/transform_charts.input_comparison_figure`.
"""

from __future__ import annotations

import panel as pn

from workbench.transform.compare import PRESETS
from workbench.ui import charts
from workbench.ui.transform_charts import input_comparison_figure
from workbench.ui.transform_state import TransformCompare
from workbench.ui.views.common import View

_H = 560


class TransformsView(View):
    """Pick a layer and a transform; the chart shows its input before | after."""

    def panel(self) -> pn.viewable.Viewable:
        state = self.state
        cmp = TransformCompare(state=state)
        names = [x.name for x in state.layers]
        default = next((n for n in names if n.endswith("mlp.down_proj")), names[0] if names else None)
        layer = pn.widgets.Select(name="layer", options=names, value=default, width=360)
        kind = pn.widgets.Select(name="transform", options=list(PRESETS), value=list(PRESETS)[0], width=240)
        go_btn = pn.widgets.Button(name="compare", button_type="primary", align="end", width=140)
        chart = pn.pane.Plotly(
            charts.empty_figure("choose a layer and a transform, then compare", _H),
            height=_H + 10,
            sizing_mode="stretch_width",
            css_classes=["wb-chart-transform"],
        )
        state.param.watch(lambda e: setattr(layer, "options", [x.name for x in e.new]), "layers")
        go_btn.on_click(lambda _e: cmp.run(layer.value, kind.value))

        def draw(event):
            chart.object = input_comparison_figure(event.new, _H)

        cmp.param.watch(draw, "result")
        note = pn.pane.Markdown(
            "What the layer's matmul multiplies, on calibration text: per-channel absmax (top) and the "
            "values (bottom, log counts), in the original model and in its transformed copy (same function: "
            "`workbench.transform.apply`).",
            sizing_mode="stretch_width",
        )
        return pn.Column(
            pn.Row(layer, kind, go_btn), note, chart, name="Transforms", sizing_mode="stretch_width"
        )
