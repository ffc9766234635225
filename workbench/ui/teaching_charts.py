"""Figures of the teaching notebooks: numbers from `workbench.teaching.lessons` in, plotly Figures out.

Like charts.py these functions only choose marks and axes; every number is computed by the core
(`workbench.teaching.lessons`, `workbench.quant`). `explorer_figures` is what the widgets of
notebooks/01_quantization_basics redraw.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
import torch

from workbench.errors import WorkbenchError
from workbench.quant.spec import QuantSpec
from workbench.teaching import lessons as teaching
from workbench.ui.charts import ACCENT, ALERT, MUTED, _fig, empty_figure, histogram_figure


def row_figure(view: teaching.RowView, title: str | None = None) -> go.Figure:
    """One row of a weight before (dots) and after (steps) quantization, group boundaries as dashed lines."""
    fig = _fig(
        title
        or f"row {view.row}: {view.spec}  ({view.bits_per_weight:.3f} bits/weight, "
        f"layer SQNR {view.sqnr_db:.1f} dB)",
        height=320,
    )
    x = list(view.columns)
    fig.add_scatter(x=x, y=view.weights, mode="markers", name="original", marker=dict(color=MUTED, size=5))
    fig.add_scatter(
        x=x,
        y=view.dequantized,
        mode="lines",
        name="quantized",
        line=dict(color=ACCENT, width=1.5, shape="hvh"),
    )
    for b in (b for b in view.boundaries if b > view.columns.start):
        fig.add_vline(x=b - 0.5, line=dict(color=ALERT, width=1, dash="dot"))
    fig.update_xaxes(title="input channel (column)")
    fig.update_yaxes(title="weight")
    fig.update_layout(legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    return fig


def sweep_figure(
    rows: Sequence[dict],
    *,
    x: str,
    y: str,
    title: str,
    label: str = "spec",
    log_y: bool = False,
    x_title: str | None = None,
    y_title: str | None = None,
) -> go.Figure:
    """Points of `rows` (dicts from teaching.spec_sweep and friends) joined in the given order, labelled."""
    fig = _fig(title, height=320)
    fig.add_scatter(
        x=[r[x] for r in rows],
        y=[r[y] for r in rows],
        mode="lines+markers+text",
        text=[str(r[label]) for r in rows],
        textposition="top center",
        line=dict(color=ACCENT),
        hovertemplate="%{text}: %{x:.3f}, %{y:.4g}<extra></extra>",
    )
    fig.update_xaxes(title=x_title or x)
    fig.update_yaxes(title=y_title or y, type="log" if log_y else "linear")
    return fig


def bars_figure(
    rows: Sequence[dict],
    *,
    x: str,
    y: str,
    title: str,
    log_y: bool = False,
    highlight: Sequence[bool] | None = None,
    y_title: str | None = None,
) -> go.Figure:
    """One bar per row (categorical x); rows flagged in `highlight` in red."""
    colors = [ALERT if h else ACCENT for h in (highlight or [False] * len(rows))]
    fig = _fig(title, height=340)
    fig.add_bar(
        x=[str(r[x]) for r in rows],
        y=[r[y] for r in rows],
        marker_color=colors,
        hovertemplate="%{x}: %{y:.4g}<extra></extra>",
    )
    fig.update_yaxes(title=y_title or y, type="log" if log_y else "linear")
    return fig


def explorer_figures(
    W: torch.Tensor, fmt: str, bits: int, group: int | str, row: int = 0, column: int = 0, width: int = 256
) -> list[go.Figure]:
    """The two figures of the quantization explorer for one widget setting.

    Returns [row `row` around `column` (`width` columns) before / after quantization, histogram of the
    group that holds `column` with that group's grid levels]; for a combination the format does not
    support, a figure that says why (and an empty one).
    """
    try:
        spec = teaching.spec_for(fmt, bits, group)
        q = QuantSpec.parse(spec)
        G = q.group_size if q.granularity == "group" else W.shape[1]
        g = column // G if q.granularity != "tensor" else 0
        start = max(0, min(column - width // 2, W.shape[1] - width))
        view = teaching.row_view(W, spec, row, width, start=start)
        levels = teaching.group_levels(W, spec, row, g)
        walk = teaching.walk_through_group(W, spec, row, g)
    except WorkbenchError as e:
        return [empty_figure(str(e)), empty_figure("")]
    edges, counts = teaching.value_histogram(walk.values, bins=60)
    hist = histogram_figure(
        edges,
        counts,
        levels=levels.tolist(),
        levels_label=f"{spec} grid",
        x_title="weight",
        title=f"row {row}, columns {walk.columns[0]}..{walk.columns[1] - 1}: "
        f"{levels.numel()} levels, max error {walk.max_error:.3g}",
    )
    return [row_figure(view), hist]
