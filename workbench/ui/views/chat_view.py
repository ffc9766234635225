"""Chat view: the same prompt through the reference and the quantized model, side by side, with tokens/s."""

from __future__ import annotations

import html

import panel as pn

from workbench.ui.views.common import View


class ChatView(View):
    """Greedy generation (`runtime.decode.make_decoder`: the plan's K/V specs store the cache quantized) on a
    copy quantized with `runtime.apply_plan`, cache sizes beside the tokens/s (`ui.tasks.chat`)."""

    def panel(self) -> pn.viewable.Viewable:
        from workbench.runtime.decode import select_device

        state = self.state
        device, note = select_device("auto")
        where = pn.pane.Alert(
            note or f"running on {device} with the low-bit kernels",
            alert_type="warning" if note else "success",
            css_classes=["wb-device"],
        )
        prompt = pn.widgets.TextAreaInput(
            name="prompt", value="Once upon a time", height=80, sizing_mode="stretch_width"
        )
        n_new = pn.widgets.IntInput(name="new tokens", value=48, start=1, end=512, width=110)
        go = pn.widgets.Button(
            name="generate", button_type="primary", width=120, align="end", css_classes=["wb-generate"]
        )
        go.on_click(lambda _e: state.chat(prompt.value, n_new.value))
        log = pn.Column(sizing_mode="stretch_width")

        def show(entries):
            cards = []
            for r in reversed(entries[-5:]):

                def side(title, text, tps):
                    return pn.Column(
                        pn.pane.Markdown(f"**{title}** &middot; {tps:.1f} tokens/s"),
                        pn.pane.HTML(
                            f"<div style='white-space: pre-wrap'>{html.escape(text)}</div>",
                            sizing_mode="stretch_width",
                        ),
                        sizing_mode="stretch_width",
                    )

                head = (
                    f"prompt: *{r['prompt']}* &middot; {r['device']}, decode mode {r['mode']} &middot; "
                    f"{r['quantized_layers']} quantized layers"
                    + (
                        f", {r['fallback_layers']} on the torch reference "
                        f"({'; '.join(r.get('fallback_reasons', [])) or 'no kernel'})"
                        if r["fallback_layers"]
                        else ""
                    )
                )
                if r.get("q_cache_bytes") is not None:
                    ref_mb = (
                        f" (reference {r['ref_cache_bytes'] / 1e6:,.2f} MB)"
                        if r.get("ref_cache_bytes")
                        else ""
                    )
                    head += f"  \nK/V cache {r['q_cache_bytes'] / 1e6:,.2f} MB{ref_mb}"
                if r.get("kv_note"):
                    head += f" &middot; {r['kv_note']}"
                cards.append(
                    pn.Card(
                        pn.pane.Markdown(head + (f"  \n{r['note']}" if r["note"] else "")),
                        pn.Row(
                            side("reference", r["reference"], r["ref_tokens_per_s"]),
                            side("quantized (current plan)", r["quantized"], r["q_tokens_per_s"]),
                            sizing_mode="stretch_width",
                        ),
                        hide_header=True,
                        sizing_mode="stretch_width",
                    )
                )
            log.objects = cards

        state.param.watch(lambda e: show(e.new), "chat_log")
        show(state.chat_log)
        return pn.Column(where, prompt, pn.Row(n_new, go), log, sizing_mode="stretch_width", name="Chat")
