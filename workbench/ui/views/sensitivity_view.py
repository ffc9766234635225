"""Sensitivity view: heatmap of layers x specs (click a cell to assign that spec) and the Pareto front of
size vs predicted cost with the current plan marked."""

from __future__ import annotations

import panel as pn

from workbench.inventory import ROLES
from workbench.ui import charts
from workbench.ui.state import CANDIDATE_SPECS, SENSITIVITY_SPECS
from workbench.ui.views.common import View, totals_line


class SensitivityView(View):
    """All numbers come from the SensitivityTable (sensitivity.py) and allocate.pareto_front."""

    def panel(self) -> pn.viewable.Viewable:
        state = self.state
        specs = pn.widgets.MultiChoice(
            name="specs to scan",
            value=list(SENSITIVITY_SPECS),
            options=[s for s in CANDIDATE_SPECS if s != "bf16"] + ["int3_g64:gptq", "int4_g128:awq"],
            sizing_mode="stretch_width",
        )
        run = pn.widgets.Button(
            name="compute sensitivity (proxy)",
            button_type="primary",
            width=240,
            align="end",
            css_classes=["wb-sensitivity-run"],
        )
        run.on_click(lambda _e: state.compute_sensitivity(list(specs.value)))
        heat = pn.pane.Plotly(
            charts.empty_figure("no sensitivity table yet: press 'compute sensitivity'", 400),
            sizing_mode="stretch_width",
            css_classes=["wb-heatmap"],
        )
        pareto = pn.pane.Plotly(
            charts.empty_figure("the Pareto front appears with the sensitivity table"),
            sizing_mode="stretch_width",
            height=420,
            css_classes=["wb-pareto"],
        )
        note = pn.pane.Markdown(
            "Cost = relative output error of the layer quantized alone, on calibration inputs "
            "(tr(D G D^T) / tr(W G W^T)); colour is log10. **Click a cell** to assign that spec to that "
            "layer. The Pareto front is exact over all plans the table allows (bf16 costs 0); the star is "
            "the current plan.",
            sizing_mode="stretch_width",
        )

        def ordered_layers(table):
            rank = {r: i for i, r in enumerate(ROLES)}
            return sorted(
                table.layers, key=lambda x: (x.block if x.block is not None else 10**9, rank[x.role])
            )

        def draw(*_events):
            table = state.sensitivity
            if table is None:
                return
            layers = ordered_layers(table)
            names = [x.name for x in layers]
            costs = [[table.cost.get(n, {}).get(s) for s in table.specs] for n in names]
            current = {n: str(state.resolved[n]) for n in names if n in state.resolved}
            heat.object = charts.heatmap_figure(names, table.specs, costs, current=current)
            heat.height = max(400, 14 * len(names) + 140)
            from workbench.allocate import pareto_front

            pins = {n: str(state.resolved[n]) for n in state.pinned}
            front = pareto_front(table, pinned=pins, max_points=400)
            cost = state.cost.total if state.cost is not None else None
            pareto.object = charts.pareto_figure(
                [p.mb for p in front],
                [p.cost for p in front],
                labels=[f"{p.avg_bits:.2f} b/w" for p in front],
                current_mb=state.totals.mb,
                current_cost=cost,
            )

        def on_click(event):
            data = event.new
            if not data or not data.get("points"):
                return
            point = data["points"][0]
            spec, layer = point.get("x"), point.get("y")
            if isinstance(spec, str) and isinstance(layer, str):
                state.set_layer_spec(layer, spec)

        heat.param.watch(on_click, "click_data")
        state.param.watch(draw, ["sensitivity", "revision"])
        draw()
        return pn.Column(
            totals_line(state),
            pn.Row(specs, run, sizing_mode="stretch_width"),
            note,
            pareto,
            heat,
            sizing_mode="stretch_width",
            name="Sensitivity",
        )
