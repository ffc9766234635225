"""Header: model source and load button, running jobs with progress and cancel, notices, about the model."""

from __future__ import annotations

import panel as pn

from workbench.ui.views.common import View, jobs_panel, notice


def about_markdown(description) -> str:
    """'About this model' text from a ModelDescription (caveats included)."""
    d = description
    lines = [
        f"**{d.name}** &middot; {d.architecture} &middot; {d.n_params / 1e6:.2f}M parameters &middot; "
        f"{d.n_layers} blocks, hidden {d.hidden_size}, vocab {d.vocab_size}, context {d.max_context} "
        f"&middot; loaded as {d.dtype}",
        f"<small>from `{d.origin}` &middot; fingerprint `{d.fingerprint}`</small>",
    ]
    lines += [f"- **caveat**: {c}" for c in d.caveats]
    return "\n\n".join(lines)


class HeaderView(View):
    """Top of the app, visible from every tab."""

    def panel(self) -> pn.viewable.Viewable:
        state = self.state
        source = pn.widgets.TextInput(
            name="model",
            value=state.source,
            width=360,
            placeholder="default | folder | file.gguf | llama2.c .bin",
        )
        load = pn.widgets.Button(name="load", button_type="primary", width=80, align="end")

        def on_load(_event):
            if state.phase == "loading":
                state.notify("a model is already loading", "warning")
                return
            state.load(source.value.strip() or "default")

        load.on_click(on_load)
        state.param.watch(lambda e: setattr(source, "value", e.new), "source")  # restored after a failure

        def about(description, phase):
            if phase == "loading":
                return pn.pane.Markdown("*loading the model...*", css_classes=["wb-about"])
            if description is None:
                return pn.pane.Markdown(
                    "*no model loaded: press **load** (the default is SmolLM2-135M-Instruct)*",
                    css_classes=["wb-about"],
                )
            return pn.Card(
                pn.pane.Markdown(about_markdown(description), sizing_mode="stretch_width"),
                title="About this model",
                collapsed=False,
                sizing_mode="stretch_width",
                css_classes=["wb-about"],
                margin=(0, 5),
            )

        return pn.Column(
            pn.Row(
                pn.pane.Markdown("## Quant Workbench", margin=(0, 10)),
                source,
                load,
                sizing_mode="stretch_width",
            ),
            jobs_panel(state),
            notice(state),
            pn.bind(about, state.param.description, state.param.phase),
            sizing_mode="stretch_width",
        )
