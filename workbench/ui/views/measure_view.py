"""Measure view: evaluate the current plan (or the reference) in the background; results accumulate."""

from __future__ import annotations

import pandas as pd
import panel as pn

from workbench.ui.views.common import View, jobs_panel, totals_line

_COLUMNS = ["plan", "MB", "avg bits", "ppl", "ref ppl", "KL (nats)", "top-1", "tokens", "text", "seconds"]


class MeasureView(View):
    """Perplexity, KL(P_ref || P_q) and top-1 agreement from `workbench.measure.evaluate` (fake
    quantization)."""

    def panel(self) -> pn.viewable.Viewable:
        state = self.state
        cfg = state.eval_settings()
        text = pn.widgets.Select(
            name="text",
            css_classes=["wb-eval-text"],
            value=cfg["text"],
            width=160,
            options=["wikitext2", "wikitext2-raw", "ptb", "c4", "tinystories", "wiki"],
        )
        seq_len = pn.widgets.IntInput(name="window", value=cfg["seq_len"], start=16, step=64, width=100)
        tokens = pn.widgets.IntInput(
            name="max tokens",
            value=cfg["max_tokens"],
            start=256,
            step=1024,
            width=120,
            css_classes=["wb-max-tokens"],
        )
        run = pn.widgets.Button(
            name="evaluate current plan",
            button_type="primary",
            width=200,
            align="end",
            css_classes=["wb-evaluate"],
        )
        ref = pn.widgets.Button(name="evaluate reference", width=170, align="end")

        def go(reference: bool):
            state.evaluate(
                reference=reference, text=text.value, seq_len=seq_len.value, max_tokens=tokens.value
            )

        run.on_click(lambda _e: go(False))
        ref.on_click(lambda _e: go(True))
        results = pn.widgets.Tabulator(
            pd.DataFrame(columns=_COLUMNS),
            show_index=False,
            disabled=True,
            selectable=1,
            layout="fit_data_table",
            sizing_mode="stretch_width",
            height=300,
            css_classes=["wb-results"],
        )
        restore = pn.widgets.Button(name="restore the selected row's plan", width=260)

        def on_results(*_events):
            results.value = pd.DataFrame(
                [{k: r[k] for k in _COLUMNS} for r in state.evaluations], columns=_COLUMNS
            )

        def on_restore(_event):
            if not results.selection:
                state.notify("select a result row first", "warning")
                return
            row = state.evaluations[results.selection[0]]
            if row["plan"] == "reference":
                state.notify("the reference has no plan to restore", "warning")
                return
            state.load_plan_text(row["plan_json"], source=f"result '{row['plan']}'")

        restore.on_click(on_restore)
        state.param.watch(on_results, "evaluations")
        on_results()
        return pn.Column(
            totals_line(state),
            pn.pane.Markdown(
                "Runs in the background (the app stays usable; cancel from the job row). Weights are "
                "fake-quantized with the plan, then restored; a failed run leaves the plan intact."
            ),
            pn.Row(text, seq_len, tokens, run, ref),
            jobs_panel(state),
            pn.pane.Markdown("#### Results (one row per run)"),
            results,
            restore,
            sizing_mode="stretch_width",
            name="Measure",
        )
