"""Chart functions of the app: plain numbers in, a plotly Figure out.

Every number drawn here was computed by the core library (histograms, absmax, outlier masks, grid levels,
sensitivity costs, Pareto points); these functions only choose marks, colours and axes. Log colour scales
are a display choice (the hover text shows the raw value).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go

_LAYOUT = dict(template="plotly_white", margin=dict(l=50, r=20, t=40, b=40), height=300)
ACCENT, MUTED, ALERT, GOOD = "#1f77b4", "#9aa7b5", "#d62728", "#2ca02c"


def _fig(title: str, **layout) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=dict(text=title, font=dict(size=14)), **{**_LAYOUT, **layout})
    return fig


def empty_figure(message: str, height: int = 300) -> go.Figure:
    """A blank chart that says why there is nothing to draw."""
    fig = _fig("", height=height)
    fig.add_annotation(
        text=message,
        x=0.5,
        y=0.5,
        xref="paper",
        yref="paper",
        showarrow=False,
        font=dict(size=13, color="#555"),
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def histogram_figure(
    edges: Sequence[float],
    counts: Sequence[float],
    *,
    title: str,
    log_y: bool = False,
    levels: Sequence[float] | None = None,
    levels_label: str = "grid levels",
    x_title: str = "value",
) -> go.Figure:
    """Bars of a precomputed histogram, optionally with vertical lines at quantization grid levels.

    Args:
        edges: bin edges [B + 1]. counts: bin counts [B].
        levels: grid levels (in weight units) of the chosen format, drawn as thin vertical lines.
    """
    edges, counts = list(map(float, edges)), list(map(float, counts))
    assert len(edges) == len(counts) + 1, "histogram needs len(edges) == len(counts) + 1"
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    fig = _fig(title)
    fig.add_bar(
        x=centers,
        y=counts,
        width=widths,
        marker_color=ACCENT,
        name="count",
        hovertemplate="%{x:.4g}: %{y}<extra></extra>",
    )
    if levels is not None and len(levels):
        ys: list[float | None] = []
        xs: list[float | None] = []
        top = max(counts) if counts else 1.0
        for v in levels:
            xs += [float(v), float(v), None]
            ys += [0.0 if not log_y else 0.5, top, None]
        fig.add_scatter(
            x=xs,
            y=ys,
            mode="lines",
            line=dict(color=ALERT, width=1),
            opacity=0.6,
            name=f"{levels_label} ({len(levels)})",
            hoverinfo="skip",
        )
    fig.update_layout(
        bargap=0,
        showlegend=levels is not None and len(levels) > 0,
        legend=dict(x=0.01, y=0.99, xanchor="left", yanchor="top", bgcolor="rgba(255,255,255,0.7)"),
    )
    fig.update_xaxes(title=x_title)
    fig.update_yaxes(title="count", type="log" if log_y else "linear")
    return fig


def channel_absmax_figure(
    values: Sequence[float], outliers: Sequence[bool] | None, *, title: str, x_title: str = "channel"
) -> go.Figure:
    """Per-channel absmax as bars; channels flagged as outliers (by the core) in red."""
    values = list(map(float, values))
    flags = list(outliers) if outliers is not None else [False] * len(values)
    assert len(flags) == len(values), "one outlier flag per channel"
    colors = [ALERT if f else ACCENT for f in flags]
    n_out = sum(bool(f) for f in flags)
    fig = _fig(f"{title}  ({n_out} outlier{'s' if n_out != 1 else ''})")
    fig.add_bar(
        x=list(range(len(values))),
        y=values,
        marker_color=colors,
        marker_line_width=0,
        hovertemplate="channel %{x}: %{y:.4g}<extra></extra>",
    )
    fig.update_layout(bargap=0)
    fig.update_xaxes(title=x_title)
    fig.update_yaxes(title="max |value|")
    return fig


def error_by_spec_figure(
    specs: Sequence[str],
    values: Sequence[float | None],
    bits: Sequence[float],
    *,
    title: str,
    current: str | None = None,
    label: str = "relative output error",
    log_y: bool = True,
) -> go.Figure:
    """One bar per candidate spec (in the given order); the layer's current spec highlighted in red.

    Args:
        values: the error measure per spec (None: not available, drawn as a gap).
        bits: exact bits per weight of each spec on this layer (shown under the name).
    """
    fig = _fig(title)
    colors = [ALERT if s == current else ACCENT for s in specs]
    fig.add_bar(
        x=[f"{s}<br>{b:.2f} b/w" for s, b in zip(specs, bits)],
        y=[None if v is None else float(v) for v in values],
        marker_color=colors,
        customdata=list(specs),
        hovertemplate="%{customdata}: %{y:.4g}<extra></extra>",
    )
    positive = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    fig.update_yaxes(title=label, type="log" if log_y and positive else "linear")
    fig.update_xaxes(tickfont=dict(size=10))
    return fig


def heatmap_figure(
    layers: Sequence[str],
    specs: Sequence[str],
    costs: Sequence[Sequence[float | None]],
    *,
    title: str = "sensitivity (log10 cost)",
    current: dict[str, str] | None = None,
    height: int | None = None,
) -> go.Figure:
    """Layers (rows, in the given order) x specs (columns); colour = log10 of the cost.

    Args:
        costs: [n_layers][n_specs] cost (None or non-positive: drawn blank / as the smallest colour).
        current: layer -> spec of the current plan, marked with a dot.
    """
    z, text = [], []
    for row in costs:
        zr, tr = [], []
        for c in row:
            if c is None or not math.isfinite(c):
                zr.append(None)
                tr.append("n/a")
            else:
                zr.append(math.log10(c) if c > 0 else None)
                tr.append(f"{c:.3g}")
            # log10 is a colour mapping only; the hover shows the cost itself
        z.append(zr)
        text.append(tr)
    fig = _fig(title, height=height or max(300, 14 * len(layers) + 120))
    fig.add_heatmap(
        z=z,
        x=list(specs),
        y=list(layers),
        text=text,
        colorscale="Viridis",
        colorbar=dict(title="log10"),
        hovertemplate="%{y}<br>%{x}: cost %{text}<extra></extra>",
    )
    if current:
        xs = [current[name] for name in layers if current.get(name) in specs]
        ys = [name for name in layers if current.get(name) in specs]
        marker = dict(color="white", size=7, line=dict(color="black", width=1))
        fig.add_scatter(x=xs, y=ys, mode="markers", marker=marker, name="current plan", hoverinfo="skip")
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=9))
    fig.update_xaxes(side="top")  # spec labels above the first rows, where the eye starts
    fig.update_layout(showlegend=False, margin=dict(t=90))
    return fig


def pareto_figure(
    front_mb: Sequence[float],
    front_cost: Sequence[float],
    *,
    current_mb: float | None = None,
    current_cost: float | None = None,
    labels: Sequence[str] | None = None,
    title: str = "size vs predicted cost",
    checks: Sequence[dict] = (),
) -> go.Figure:
    """The Pareto front (size MB vs predicted cost, log y) with the current plan marked.

    `checks`: measured plans (`verify.PlanCheck` dicts: label, mb, predicted, kl), drawn as their predicted
    cost (hollow) and measured KL (filled) joined by a thin line, so prediction and truth sit side by side.
    """
    fig = _fig(title)
    fig.add_scatter(
        x=list(front_mb),
        y=list(front_cost),
        mode="lines+markers",
        name="Pareto front",
        line=dict(color=ACCENT),
        marker=dict(size=5),
        text=list(labels) if labels else None,
        hovertemplate="%{x:.3f} MB, cost %{y:.3g}<extra>%{text}</extra>"
        if labels
        else "%{x:.3f} MB, cost %{y:.3g}<extra></extra>",
    )
    if current_mb is not None and current_cost is not None:
        fig.add_scatter(
            x=[current_mb],
            y=[current_cost],
            mode="markers",
            name="current plan",
            marker=dict(color=ALERT, size=12, symbol="star"),
            hovertemplate="current plan: %{x:.3f} MB, cost %{y:.3g}<extra></extra>",
        )
    log = any(c and c > 0 for c in front_cost)
    _add_checks(fig, list(checks), log)
    fig.update_xaxes(title="size (MB)")
    fig.update_yaxes(
        title="predicted cost / measured KL (nats)" if checks else "predicted cost",
        type="log" if log else "linear",
    )
    fig.update_layout(legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    return fig


def _add_checks(fig: go.Figure, checks: list[dict], log: bool) -> None:
    """Measured plans beside their predictions (see `pareto_figure`). One colour per trace, so the legend's
    marker is the one drawn; the plan's own label is red, like the current-plan star."""
    if not checks:
        return
    for c in checks:
        fig.add_scatter(
            x=[c["mb"], c["mb"]],
            y=[c["predicted"], c["kl"]],
            mode="lines",
            line=dict(color="#999999", width=1, dash="dot"),
            showlegend=False,
            hoverinfo="skip",
        )
    for key, name, symbol in (("predicted", "predicted", "circle-open"), ("kl", "measured KL", "circle")):
        fig.add_scatter(
            x=[c["mb"] for c in checks],
            y=[c[key] for c in checks],
            mode="markers",
            name=name,
            marker=dict(size=11, symbol=symbol, color=CHECK_INK),
            hovertemplate=[
                f"{c['label']}: {c['mb']:.3f} MB, {c['avg_bits']:.3f} b/w, {name} %{{y:.4g}}<extra></extra>"
                for c in checks
            ],
        )
    _label_checks(fig, checks, log)


CHECK_INK = "#444444"  # the measured and predicted markers of verified plans
_CHAR_PX, _LABEL_PX = 6.5, 14  # a label's box at font size 11: width per character, height
_PLOT_PX = (900, 220)  # plot area assumed for placing labels (the pane is larger: labels only spread more)
# label positions tried in turn (side: -1 left, 0 centred, 1 right; pixels up < 0): above first, since the
# measured points sit above the front more often than not
_OFFSETS = [
    (0, -20),
    (-1, -20),
    (1, -20),
    (-1, -42),
    (1, -42),
    (0, -42),
    (0, 22),
    (-1, 22),
    (1, 22),
    (0, -64),
]


def _label_checks(fig: go.Figure, checks: list[dict], log: bool) -> None:
    """Each measured point's label (a uniform plan's spec, 'this plan') as an annotation placed where it
    overlaps no other label and no marker (`label_offsets`), with a leader line to its point. On a log axis
    (`log`) an annotation's y is log10 of the value (plotly's convention); zero costs are not drawn there."""
    xs = [x for t in fig.data for x in (t.x or ())]
    ys = [y for t in fig.data for y in (t.y or ()) if y is not None and (y > 0 or not log)]
    texts = [c["label"].removeprefix("uniform ") for c in checks]
    pts = [(c["mb"], c["kl"]) for c in checks] + [(c["mb"], c["predicted"]) for c in checks]
    px = _to_pixels(pts, xs, ys, log)
    for c, text, (ax, ay) in zip(checks, texts, label_offsets(px[: len(checks)], texts, px)):
        fig.add_annotation(
            x=c["mb"],
            y=math.log10(c["kl"]) if log else c["kl"],
            text=text,
            ax=ax,
            ay=ay,
            showarrow=True,
            arrowhead=0,
            arrowwidth=1,
            arrowcolor="#999999",
            standoff=6,
            font=dict(size=11, color=ALERT if c["kind"] == "plan" else CHECK_INK),
            bgcolor="rgba(255,255,255,0.85)",
        )


def _to_pixels(pts: list[tuple[float, float]], xs, ys, log: bool) -> list[tuple[float, float]]:
    """(x, y) data points -> pixels of the assumed plot area (y down), over the range of all drawn values."""
    fy = math.log10 if log else float
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(fy(y) for y in ys), max(fy(y) for y in ys)
    w, h = _PLOT_PX
    return [((x - x0) / ((x1 - x0) or 1) * w, (y1 - fy(y)) / ((y1 - y0) or 1) * h) for x, y in pts]


def label_offsets(
    points: Sequence[tuple[float, float]], texts: Sequence[str], avoid: Sequence[tuple[float, float]] = ()
) -> list[tuple[float, float]]:
    """Pixel offsets (ax, ay) of each point's label (screen pixels, y down): the first of `_OFFSETS` whose
    label box overlaps no label placed before and no marker (6 px around each of `points` and `avoid`);
    above the point when none is free."""
    placed: list[tuple[float, float, float, float]] = []
    markers = [(mx - 6, my - 6, mx + 6, my + 6) for mx, my in [*points, *avoid]]
    out = []
    for (x, y), text in zip(points, texts):
        half = label_box(0, 0, text)[2]
        candidates = [(side * (half + 8), ay) for side, ay in _OFFSETS]
        free = (
            (ax, ay)
            for ax, ay in candidates
            if not any(_overlap(label_box(x + ax, y + ay, text), b) for b in [*placed, *markers])
        )
        ax, ay = next(free, candidates[0])
        placed.append(label_box(x + ax, y + ay, text))
        out.append((ax, ay))
    return out


def label_box(x: float, y: float, text: str) -> tuple[float, float, float, float]:
    """The box (x0, y0, x1, y1) in pixels of `text` drawn centred at (x, y) (font size 11, approximate)."""
    w = len(text) * _CHAR_PX + 6
    return (x - w / 2, y - _LABEL_PX / 2, x + w / 2, y + _LABEL_PX / 2)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether boxes (x0, y0, x1, y1) intersect."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
