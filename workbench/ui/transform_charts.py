"""The Transforms tab's chart: a layer's input before and after a transform, side by side (pure function).

Top row: absmax of every input channel (an outlier channel is a spike; a rotation flattens it). Bottom row:
histogram of the values, log counts. Each column's title carries its kurtosis and max/median channel ratio.
All numbers come from `workbench.transform.compare.compare_transform`.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def _title(tag: str, p) -> str:
    s = p.stats
    return f"{tag}: kurtosis {s.kurtosis:,.1f}, max/median {s.max_median:,.1f}, absmax {s.absmax:,.2f}"


def input_comparison_figure(cmp, height: int = 560) -> go.Figure:
    """2 x 2 figure of an InputComparison: channel absmax (top), value histogram (bottom); before | after."""
    kinds = " + ".join(f"{t.kind}:{getattr(t, 'where', getattr(t, 'match', ''))}" for t in cmp.transforms)
    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=(_title("before", cmp.before), _title(f"after {kinds}", cmp.after), "", ""),
        vertical_spacing=0.14,
        horizontal_spacing=0.07,
    )
    for col, (p, color) in enumerate(((cmp.before, "#c0392b"), (cmp.after, "#2471a3")), start=1):
        fig.add_trace(
            go.Scatter(
                y=p.channel_absmax,
                mode="lines",
                line=dict(color=color, width=1),
                name=f"channel absmax {col}",
            ),
            row=1,
            col=col,
        )
        mids = [(a + b) / 2 for a, b in zip(p.edges[:-1], p.edges[1:])]
        fig.add_trace(go.Bar(x=mids, y=p.counts, marker_color=color, name=f"values {col}"), row=2, col=col)
        fig.update_yaxes(type="log", row=2, col=col, title_text="count" if col == 1 else None)
        fig.update_xaxes(title_text="input channel", row=1, col=col)
        fig.update_xaxes(title_text="value", row=2, col=col)
    fig.update_yaxes(title_text="max |x|", row=1, col=1)
    fig.update_layout(
        height=height,
        showlegend=False,
        margin=dict(l=50, r=20, t=60, b=40),
        title=dict(text=f"{cmp.layer} input over {cmp.n_tokens:,} tokens", font=dict(size=14)),
        bargap=0,
        template="plotly_white",
    )
    fig.update_annotations(font_size=12)
    return fig
