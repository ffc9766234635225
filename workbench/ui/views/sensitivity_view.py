"""Sensitivity view: heatmap of layers x specs (click a cell to assign that spec) and the Pareto front of
size vs predicted cost with the current plan marked."""

from __future__ import annotations

from dataclasses import asdict

import panel as pn

from workbench.defaults import DEFAULT_METHOD
from workbench.model.inventory import ROLES
from workbench.ui import charts
from workbench.ui.state import CANDIDATE_SPECS, SENSITIVITY_SPECS
from workbench.ui.views.common import View, totals_line


class SensitivityView(View):
    """All numbers come from the SensitivityTable (sensitivity.py) and allocate.pareto_front."""

    def _controls(self) -> pn.Row:
        """Specs to scan, the method, and the compute / verify buttons."""
        state = self.state
        specs = pn.widgets.MultiChoice(
            name="specs to scan",
            value=list(SENSITIVITY_SPECS),
            options=[s for s in CANDIDATE_SPECS if s != "bf16"] + ["int3_g64:gptq", "int4_g128:awq"],
            sizing_mode="stretch_width",
        )
        method = pn.widgets.Select(
            name="method",
            options=["fisher", "proxy"],
            value=DEFAULT_METHOD,
            width=110,
            css_classes=["wb-method"],
        )
        run = pn.widgets.Button(
            name="compute sensitivity",
            button_type="primary",
            width=200,
            align="end",
            css_classes=["wb-sensitivity-run"],
        )
        run.on_click(lambda _e: state.compute_sensitivity(list(specs.value), method=method.value))
        verify = pn.widgets.Button(
            name="verify current plan",
            button_type="success",
            width=180,
            align="end",
            css_classes=["wb-verify"],
        )
        verify.on_click(lambda _e: state.verify())
        return pn.Row(specs, method, run, verify, sizing_mode="stretch_width")

    def _draw_heatmap(self, table, page: pn.widgets.Select, heat: pn.pane.Plotly) -> None:
        """One page of blocks of the (layer x spec) table, the current plan's specs marked."""
        state = self.state
        layers = _ordered_layers(table)
        pages = block_pages(layers)
        page.options = list(pages)
        if page.value not in pages:
            page.value = next(iter(pages))
        layers = [x for x in layers if pages[page.value](x)]
        names = [x.name for x in layers]
        costs = [[table.cost.get(n, {}).get(s) for s in table.specs] for n in names]
        current = {n: str(state.resolved[n]) for n in names if n in state.resolved}
        heat.object = charts.heatmap_figure(names, table.specs, costs, current=current)
        heat.height = max(400, 14 * len(names) + 140)

    def _draw_pareto(self, table, pareto: pn.pane.Plotly, verdict: pn.pane.Markdown) -> None:
        """The exact Pareto front, the current plan, and the verified points beside the prediction."""
        from workbench.plan.allocate import pareto_front

        state = self.state
        pins = {n: str(state.resolved[n]) for n in state.pinned}
        front = pareto_front(table, pinned=pins, max_points=400)
        cost = state.cost.total if state.cost is not None else None
        v = state.verification
        pareto.object = charts.pareto_figure(
            [p.mb for p in front],
            [p.cost for p in front],
            labels=[f"{p.avg_bits:.2f} b/w" for p in front],
            current_mb=state.totals.mb,
            current_cost=cost,
            checks=[asdict(r) for r in v.rows] if v is not None else (),
        )
        verdict.object = verification_text(v)

    def panel(self) -> pn.viewable.Viewable:
        state = self.state
        page = pn.widgets.Select(name="blocks shown", options=["all"], value="all", width=150)
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
            "**fisher** (default): the layer's output error weighted by the output Fisher, an estimate of "
            "the KL (nats) from quantizing that layer alone; summed over layers it predicts a plan's KL. "
            "**proxy**: relative output error tr(D G D^T) / tr(W G W^T), which does not weight layers by "
            "their effect on the output. Colour is log10. **Click a cell** to assign that spec to that "
            "layer. "
            "The Pareto front is exact over all plans the table allows (bf16 costs 0); the star is the "
            "current plan. **Verify** measures the current plan and the uniform plans next to it in size "
            "(quick evaluation, cached) and draws measured KL (filled) beside the prediction (hollow).",
            sizing_mode="stretch_width",
        )
        verdict = pn.pane.Markdown("", sizing_mode="stretch_width", css_classes=["wb-verdict"])

        def draw(*_events):
            table = state.sensitivity
            if table is None:
                return
            self._draw_heatmap(table, page, heat)
            self._draw_pareto(table, pareto, verdict)

        def on_click(event):
            data = event.new
            if not data or not data.get("points"):
                return
            point = data["points"][0]
            spec, layer = point.get("x"), point.get("y")
            if isinstance(spec, str) and isinstance(layer, str):
                state.set_layer_spec(layer, spec)

        heat.param.watch(on_click, "click_data")
        state.param.watch(draw, ["sensitivity", "revision", "verification"])
        page.param.watch(draw, "value")
        draw()
        return pn.Column(
            totals_line(state),
            self._controls(),
            note,
            pareto,
            verdict,
            page,
            heat,
            sizing_mode="stretch_width",
            name="Sensitivity",
        )


def _ordered_layers(table) -> list:
    """The table's layers by block, then by role (q k v o gate up down), blocks outside last."""
    rank = {r: i for i, r in enumerate(ROLES)}
    return sorted(table.layers, key=lambda x: (x.block if x.block is not None else 10**9, rank[x.role]))


def verification_text(v) -> str:
    """Markdown table of a Verification (predicted vs measured) and its verdict; '' when there is none."""
    if v is None:
        return ""
    lines = [
        f"**Verified on {v.n_tokens} tokens of '{v.text}'** (reference perplexity {v.ref_ppl:.3f}): "
        + v.verdict(),
        "",
        f"| plan | avg bits | MB | predicted ({v.method}) | measured KL | perplexity | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in v.rows:
        lines.append(
            f"| {r.label} | {r.avg_bits:.3f} | {r.mb:.3f} | {r.predicted:.4g} | {r.kl:.4g} | {r.ppl:.4g} "
            f"| {100 * r.top1:.1f}% |"
        )
    return "\n".join(lines)


def block_pages(layers, per_page: int = 8) -> dict:
    """{label: predicate} pages of `per_page` decoder blocks (layers outside blocks on the last page), so
    the heatmap stays a screen or two tall; a model of at most `per_page` blocks has one page, "all"."""
    blocks = sorted({x.block for x in layers if x.block is not None})
    if len(blocks) <= per_page:
        return {"all": lambda x: True}
    pages = {}
    for i in range(0, len(blocks), per_page):
        lo, hi = blocks[i], blocks[min(i + per_page, len(blocks)) - 1]
        last = i + per_page >= len(blocks)
        label = f"blocks {lo}-{hi}" + (" + head" if last else "")
        pages[label] = lambda x, lo=lo, hi=hi, last=last: (
            (last and x.block is None) or (x.block is not None and lo <= x.block <= hi)
        )
    return pages
