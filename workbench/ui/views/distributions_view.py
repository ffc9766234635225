"""Distributions view: the selected layer's weights (histogram with the grid overlaid, channel absmax with
outliers), its calibration activations, and its quantization error for every candidate spec."""

from __future__ import annotations

import panel as pn

from workbench.ui import charts
from workbench.ui.state import CANDIDATE_SPECS
from workbench.ui.views.common import View

_H = 300


def _weight_charts(panes: dict, report, log_y: bool) -> None:
    """The weight histogram (grid overlaid) and the per-channel absmax charts of a LayerReport."""
    w = report.weights
    levels = None if report.grid is None else report.grid.levels.tolist()
    panes["hist"].object = charts.histogram_figure(
        w.hist_edges.tolist(),
        w.hist_counts.tolist(),
        log_y=log_y,
        levels=levels,
        levels_label=f"{report.grid_spec} grid (group with median scale)",
        title=f"weights of {report.name} ({report.shape[0]} x {report.shape[1]})",
        x_title="w",
    )
    panes["out"].object = charts.channel_absmax_figure(
        w.absmax_out.tolist(),
        report.out_outliers.tolist(),
        title=f"absmax per output channel (outlier: > {report.ratio:g}x median)",
        x_title="output channel",
    )
    panes["in"].object = charts.channel_absmax_figure(
        w.absmax_in.tolist(),
        report.in_outliers.tolist(),
        title=f"absmax per input channel (outlier: > {report.ratio:g}x median)",
        x_title="input channel",
    )


def _activation_charts(panes: dict, report, log_y: bool) -> None:
    """The input's per-channel absmax and value histogram, or a hint to compute the statistics."""
    a = report.activations
    if a is None:
        msg = "press 'compute activation statistics' (calibration forward pass, cached on disk)"
        panes["act"].object = charts.empty_figure(msg, _H)
        panes["act_hist"].object = charts.empty_figure(msg, _H)
        return
    shared = f" (input shared with {a.shared_with})" if a.shared_with else ""
    panes["act"].object = charts.channel_absmax_figure(
        a.absmax.tolist(),
        report.act_outliers.tolist(),
        x_title="input channel",
        title=f"activation absmax per input channel over {a.n_tokens} tokens{shared}",
    )
    panes["act_hist"].object = charts.histogram_figure(
        a.hist_edges.tolist(),
        a.hist_counts.tolist(),
        log_y=log_y,
        x_title="x",
        title="activation values (calibration)",
    )


def _error_chart(panes: dict, report, current: str) -> None:
    """The layer's error per candidate spec: output error on the calibration Gram, else weight SQNR."""
    errs = report.errors
    if errs and errs[0].output_error is not None:
        values, label = [e.output_error for e in errs], "relative output error (calibration Gram)"
        log_y = True
    else:
        values = [e.sqnr_db if e.sqnr_db != float("inf") else None for e in errs]
        label, log_y = "weight SQNR (dB, higher is better)", False
    panes["errors"].object = charts.error_by_spec_figure(
        [e.spec for e in errs],
        values,
        [e.bits_per_weight for e in errs],
        current=current,
        label=label,
        log_y=log_y,
        title="quantization error of this layer per spec (RTN; red: current)",
    )


def _summary(report, current: str) -> str:
    """One Markdown line: shape, spec, weight moments and outlier counts."""
    w, a = report.weights, report.activations
    return (
        f"**{report.name}** &middot; {report.shape[0]} x {report.shape[1]} &middot; current spec "
        f"`{current}` &middot; std {w.std:.3g}, min {w.min:.3g}, max {w.max:.3g}, excess kurtosis "
        f"{w.kurtosis:.2f}, {100 * w.frac_beyond_k_sigma:.3f}% beyond {w.k_sigma:g} sigma &middot; "
        f"{int(report.out_outliers.sum())} output / {int(report.in_outliers.sum())} input channel "
        f"outliers" + ("" if a is None else f", {int(report.act_outliers.sum())} activation channel outliers")
    )


def _controls(state) -> tuple:
    """(layer select, grid spec input, log checkbox, statistics button) bound to the state."""
    names = [x.name for x in state.layers]
    layer = pn.widgets.Select(
        name="layer",
        options=names,
        value=state.selected or names[0],
        width=360,
        css_classes=["wb-layer-select"],
    )
    grid = pn.widgets.AutocompleteInput(
        name="grid of spec ('' = the layer's spec)",
        value=state.grid_spec,
        options=[s for s in CANDIDATE_SPECS if s != "bf16"],
        restrict=False,
        min_characters=0,
        width=220,
    )
    log = pn.widgets.Checkbox(name="log counts", value=True, align="end")
    stats_btn = pn.widgets.Button(
        name="compute activation statistics",
        button_type="primary",
        align="end",
        width=240,
        css_classes=["wb-stats"],
    )
    state.param.watch(lambda e: setattr(layer, "options", [x.name for x in e.new]), "layers")
    layer.link(state, value="selected", bidirectional=True)
    grid.param.watch(lambda e: setattr(state, "grid_spec", (e.new or "").strip()), "value")
    stats_btn.on_click(lambda _e: state.compute_stats())
    return layer, grid, log, stats_btn


class DistributionsView(View):
    """Charts of one layer; all numbers come from `workbench.measure.layer_report` (computed in a job)."""

    def panel(self) -> pn.viewable.Viewable:
        state = self.state
        layer, grid, log, stats_btn = _controls(state)
        panes = {
            k: pn.pane.Plotly(
                charts.empty_figure("select a layer", _H),
                height=_H + 10,
                sizing_mode="stretch_width",
                css_classes=[f"wb-chart-{k}"],
            )
            for k in ("hist", "out", "in", "act", "act_hist", "errors")
        }
        summary = pn.pane.Markdown("", css_classes=["wb-layer-summary"], sizing_mode="stretch_width")

        def draw(report):
            if report is None:
                summary.object = "*computing the layer's statistics...*" if state.selected else ""
                return
            current = str(state.resolved.get(report.name, ""))
            _weight_charts(panes, report, log.value)
            _activation_charts(panes, report, log.value)
            _error_chart(panes, report, current)
            summary.object = _summary(report, current)

        state.param.watch(lambda *_e: state.request_details(), ["selected", "grid_spec", "inspection"])
        log.param.watch(lambda _e: draw(state.details), "value")
        state.param.watch(lambda e: draw(e.new), "details")
        if state.details is None and state.selected:
            state.request_details()
        else:
            draw(state.details)
        grid_row = pn.Row(layer, grid, log, stats_btn, sizing_mode="stretch_width")
        return pn.Column(
            grid_row,
            summary,
            pn.Row(panes["hist"], panes["errors"], sizing_mode="stretch_width"),
            pn.Row(panes["out"], panes["in"], sizing_mode="stretch_width"),
            pn.Row(panes["act"], panes["act_hist"], sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
            name="Distributions",
        )
