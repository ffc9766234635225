"""Model view: the layer table (sortable, filterable, spec and pin editable in place) and the totals."""

from __future__ import annotations

import panel as pn
from bokeh.models.widgets.tables import NumberFormatter, ScientificFormatter

from workbench.ui.layer_table import TABLE_COLUMNS
from workbench.ui.state import CANDIDATE_SPECS
from workbench.ui.views.common import View, totals_line

_FILTERS = {
    "layer": {"type": "input", "func": "like", "placeholder": "filter name"},
    "block": {"type": "number", "func": "=", "placeholder": "="},
    "role": {"type": "list", "valuesLookup": True, "clearable": True},
    "spec": {"type": "list", "valuesLookup": True, "clearable": True},
    "pinned": {"type": "tickCross", "tristate": True, "indeterminateValue": None},
}

_LIVE = ("spec", "bits", "KB", "cost", "pinned", "act outlier")  # what a plan edit or new statistics change


class ModelView(View):
    """Every quantizable layer with its current spec; edit `spec` or `pinned` in a cell, click a row to
    select the layer for the Distributions tab."""

    def _table(self) -> pn.widgets.Tabulator:
        """The layer table: spec and pinned editable, header filters, number formats, column titles."""
        editors = {c: None for c in TABLE_COLUMNS if c not in ("spec", "pinned")}
        editors["spec"] = {
            "type": "list",
            "values": CANDIDATE_SPECS,
            "autocomplete": True,
            "freetext": True,
            "listOnEmpty": True,
        }
        editors["pinned"] = {"type": "tickCross"}
        return pn.widgets.Tabulator(
            self.state.table,
            show_index=False,
            header_filters=_FILTERS,
            editors=editors,
            selectable=1,
            layout="fit_data_table",
            height=560,
            sizing_mode="stretch_width",
            pagination=None,
            formatters={
                "cost": ScientificFormatter(precision=3, nan_format="-", null_format="-"),
                "act outlier": NumberFormatter(format="0.0", nan_format="-", null_format="-"),
                "pinned": {"type": "tickCross", "crossElement": False},
                "params": NumberFormatter(format="0,0"),
            },
            titles={
                "bits": "bits/w",
                "KB": "KB",
                "cost": "predicted cost",
                "w max/med": "max/median |w|",
                "w kurtosis": "kurtosis (w)",
                "act outlier": "act. outlier (max/median channel)",
            },
            frozen_columns=["layer"],
            css_classes=["wb-layer-table"],
            name="layers",
        )

    def _show_table(self, table: pn.widgets.Tabulator, df) -> None:
        # Deferred to the next tick: Tabulator ignores a new value set inside its own edit callback.
        push = lambda: _push(table, df)  # noqa: E731
        pn.state.execute(push, schedule=True) if pn.state.curdoc else push()

    def _wire(self, table: pn.widgets.Tabulator) -> None:
        """Cell edits go to the state (refused ones are put back), a selected row selects the layer, a new
        state table is sent to the widget."""
        state = self.state

        def on_edit(event):
            name = table.value.iloc[event.row]["layer"]
            if event.column == "spec":
                ok = state.set_layer_spec(name, str(event.value).strip())
            elif event.column == "pinned":
                ok = state.set_pinned(name, bool(event.value))
            else:
                ok = False
            if not ok:
                self._show_table(table, state.table)  # put the cell back

        def on_select(event):
            if event.new:
                state.selected = str(table.value.iloc[event.new[0]]["layer"])

        def on_table(event):
            if event.new is not None:
                self._show_table(table, event.new)

        table.on_edit(on_edit)
        table.param.watch(on_select, "selection")
        state.param.watch(on_table, "table")

    def panel(self) -> pn.viewable.Viewable:
        state = self.state
        table = self._table()
        self._wire(table)
        self.table = table  # tests and the app reach the widget through the view
        help_text = pn.pane.Markdown(
            "Click a **spec** cell to change one layer (pick or type any spec, e.g. `int3_g64:gptq`); tick "
            "**pinned** to keep a layer out of the allocator; select a row, then open *Distributions*. "
            "Column headers sort; the row under them filters. Outlier columns: max |w| / median |w| and "
            "excess kurtosis of the weights; the input's largest channel absmax / median channel absmax "
            "(after *statistics*, Distributions tab). Sort by them to find the worst layer.",
            margin=(0, 10),
        )
        return pn.Column(totals_line(state), help_text, table, sizing_mode="stretch_width", name="Model")


def _push(table: pn.widgets.Tabulator, df) -> None:
    """Send only the cells that changed (a full 211-row table costs the browser ~0.5 s)."""
    old = table.value
    if old is None or len(old) != len(df) or not old["layer"].equals(df["layer"]):
        table.value = df
        return
    patch = {}
    for col in _LIVE:
        a, b = old[col], df[col]
        changed = ~((a == b) | (a.isna() & b.isna()))
        if changed.any():
            patch[col] = [
                (int(i), b.iloc[i].item() if hasattr(b.iloc[i], "item") else b.iloc[i])
                for i in changed.to_numpy().nonzero()[0]
            ]
    if patch:
        table.patch(patch, as_index=False)
