"""The quantization explorer of notebook 01: format / bits / group widgets and two plotly figures that are
redrawn in place (each lives in its own `ipywidgets.Output`, cleared and refilled on every change).

A plotly figure ignores IPython's `display_id`, so `display(fig, display_id=True)` + `update` appends new
figures (in JupyterLab they land in the log console when the update runs in a widget callback). An Output
widget captures the display wherever it runs, so the two figures stay where they are.
"""

from __future__ import annotations

import ipywidgets as widgets
import torch
from IPython.display import clear_output, display

from workbench.teaching import lessons as teaching
from workbench.ui.teaching_charts import explorer_figures

GROUPS = [16, 32, 64, 128, 256, "ch", "t"]


def explorer(
    W: torch.Tensor, row: int, column: int, fmt: str = "int", bits: int = 4, group: int | str = 128
) -> widgets.VBox:
    """Widgets for `explorer_figures(W [N, K], fmt, bits, group, row, column)`, drawn now and on change."""
    fmt_w = widgets.Dropdown(options=teaching.FORMAT_CHOICES, value=fmt, description="format")
    bits_w = widgets.IntSlider(value=bits, min=2, max=8, description="bits")
    group_w = widgets.Dropdown(options=GROUPS, value=group, description="group")
    outs = [widgets.Output(), widgets.Output()]

    def redraw(_change=None) -> None:
        figs = explorer_figures(W, fmt_w.value, bits_w.value, group_w.value, row, column)
        for out, fig in zip(outs, figs):
            with out:
                clear_output(wait=True)
                display(fig)

    for w in (fmt_w, bits_w, group_w):
        w.observe(redraw, "value")
    redraw()
    return widgets.VBox([widgets.HBox([fmt_w, bits_w, group_w]), *outs], layout={"width": "100%"})
