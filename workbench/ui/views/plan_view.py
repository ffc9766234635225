"""Plan editor: default spec, bulk edits by role or regex, rules, undo/redo, budget allocation, files."""

from __future__ import annotations

import io

import panel as pn

from workbench.errors import WorkbenchError
from workbench.export.files import DOWNLOADS, export_download
from workbench.model.inventory import ROLES
from workbench.ui.state import CANDIDATE_SPECS
from workbench.ui.views.common import View, totals_line

DEPLOY_FORMATS = (("gguf", "export GGUF"), ("compressed-tensors", "export compressed-tensors"))


def _spec_input(name: str, value: str = "int4_g128", width: int = 160) -> pn.widgets.AutocompleteInput:
    return pn.widgets.AutocompleteInput(
        name=name,
        options=CANDIDATE_SPECS,
        value=value,
        restrict=False,
        min_characters=0,
        width=width,
        case_sensitive=False,
    )


class PlanView(View):
    """Edit the current plan; every change is validated by the core and can be undone."""

    def _rules_table(self) -> pn.viewable.Viewable:
        state = self.state

        def show(plan, _rev):
            if plan is None:
                return pn.pane.Markdown("*no model*")
            from workbench.plan.edit import default_reach

            reach = default_reach(plan, state.layers)
            lines = [f"**default**: `{plan.default}` (reaches {reach} of {len(state.layers)} layers)"]
            if reach < len(state.layers) and plan.rules:
                lines.append(
                    "*the rules below override the default for the other layers: 'set default' only "
                    "changes the layers it reaches*"
                )
            if not plan.rules:
                lines.append("*no rules: every layer uses the default*")
            for i, r in enumerate(plan.rules, 1):
                lines.append(f"{i}. `{r.match}` &rarr; `{r.spec}`")
            if state.pinned:
                lines.append(
                    f"**pinned** ({len(state.pinned)}): " + ", ".join(f"`{p}`" for p in state.pinned)
                )
            return pn.pane.Markdown(
                "\n".join(lines),
                css_classes=["wb-rules"],
                max_height=300,
                styles={"overflow-y": "auto"},
                sizing_mode="stretch_width",
            )

        return pn.bind(show, state.param.plan, state.param.revision)

    def _deploy_button(self, fmt: str, label: str) -> pn.widgets.FileDownload:
        """A download of the plan applied to the model in a deployable format (export_files.py)."""
        state = self.state

        def make():
            try:
                data, notes = export_download(state.loaded, dict(state.resolved), fmt)
            except WorkbenchError as exc:
                state.notify(f"{fmt} export: {exc}", "error")
                return None
            if notes:
                state.notify(
                    f"{fmt} export: " + "; ".join(notes[:5]) + (" ..." if len(notes) > 5 else ""), "warning"
                )
            return io.BytesIO(data)

        return pn.widgets.FileDownload(callback=make, filename=DOWNLOADS[fmt], label=label, width=220)

    def _edit_controls(self) -> list[pn.viewable.Viewable]:
        """Rows that edit the plan: the default spec, a role, a regex, removing a rule."""
        state = self.state
        default_spec = _spec_input("default spec (all layers)", "int4_g128")
        default_btn = pn.widgets.Button(name="set default", button_type="primary", width=110, align="end")
        default_btn.on_click(lambda _e: state.set_default(default_spec.value))
        role = pn.widgets.Select(
            name="role", options=[r for r in ROLES if r != "other"], value="down", width=100
        )
        role_spec = _spec_input("spec", "int8_ch")
        role_btn = pn.widgets.Button(
            name="apply to role", button_type="primary", width=110, align="end", css_classes=["wb-role-apply"]
        )
        role_btn.on_click(lambda _e: state.set_role_spec(role.value, role_spec.value))
        regex = pn.widgets.TextInput(
            name="layer regex (full match)", placeholder=r"model\.layers\.(0|1)\..*", width=240
        )
        regex_spec = _spec_input("spec", "int8_ch")
        regex_btn = pn.widgets.Button(name="apply to regex", button_type="primary", width=110, align="end")
        regex_btn.on_click(lambda _e: state.set_regex_spec(regex.value, regex_spec.value))
        remove_idx = pn.widgets.IntInput(name="rule #", value=1, start=1, width=80)
        remove_btn = pn.widgets.Button(name="remove rule", width=110, align="end")
        remove_btn.on_click(lambda _e: state.remove_rule(remove_idx.value - 1))

        return [
            pn.Row(default_spec, default_btn),
            pn.Row(role, role_spec, role_btn),
            pn.Row(regex, regex_spec, regex_btn),
            pn.Row(remove_idx, remove_btn),
        ]

    def _history_row(self) -> pn.Row:
        """Undo / redo, enabled as the state's history allows."""
        state = self.state
        undo = pn.widgets.Button(name="undo", width=80, css_classes=["wb-undo"])
        redo = pn.widgets.Button(name="redo", width=80, css_classes=["wb-redo"])
        undo.on_click(lambda _e: state.undo())
        redo.on_click(lambda _e: state.redo())
        undo.disabled, redo.disabled = not state.can_undo, not state.can_redo
        state.param.watch(lambda e: setattr(undo, "disabled", not e.new), "can_undo")
        state.param.watch(lambda e: setattr(redo, "disabled", not e.new), "can_redo")
        return pn.Row(
            undo,
            redo,
            pn.pane.Markdown(
                "*every edit is validated; a rejected edit leaves the plan unchanged and says why*",
                margin=(8, 10),
            ),
        )

    def _budget_controls(self) -> list[pn.viewable.Viewable]:
        """The allocator's budget (avg bits or MB) and its button."""
        state = self.state
        unit = pn.widgets.RadioButtonGroup(
            name="budget in", options=["avg bits", "MB"], value="avg bits", width=160
        )
        budget = pn.widgets.FloatInput(name="budget", value=4.5, step=0.25, start=0.0, width=120)
        alloc_btn = pn.widgets.Button(
            name="allocate", button_type="success", width=110, align="end", css_classes=["wb-allocate"]
        )

        def on_unit(event):
            totals = state.totals
            if totals is not None:
                budget.value = round(totals.avg_bits if event.new == "avg bits" else totals.mb, 3)
            budget.step = 0.25 if event.new == "avg bits" else 0.05

        def on_alloc(_event):
            if unit.value == "avg bits":
                state.allocate(budget_bits=budget.value)
            else:
                state.allocate(budget_mb=budget.value)

        unit.param.watch(on_unit, "value")
        alloc_btn.on_click(on_alloc)
        alloc_note = pn.pane.Markdown(
            "Exact multiple-choice knapsack over the sensitivity table (compute it in *Sensitivity*); pinned "
            "layers keep their spec and count against the budget.",
            margin=(0, 10),
        )

        return [pn.Row(unit, budget, alloc_btn), alloc_note]

    def _file_controls(self) -> list[pn.viewable.Viewable]:
        """Load / save the plan JSON and the export downloads."""
        state = self.state
        upload = pn.widgets.FileInput(accept=".json", name="load plan JSON", css_classes=["wb-plan-upload"])

        def on_upload(event):
            if event.new:
                state.load_plan_text(event.new, source=upload.filename or "uploaded plan")

        upload.param.watch(on_upload, "value")
        save = pn.widgets.FileDownload(
            callback=lambda: io.BytesIO(state.plan_json().encode()),
            filename="plan.json",
            label="save plan JSON",
            button_type="default",
            width=170,
        )

        def export():
            out = state.export_llama_cpp()
            if out.notes:
                state.notify("llama.cpp export: " + "; ".join(out.notes), "warning")
            return io.BytesIO(out.text.encode())

        export_btn = pn.widgets.FileDownload(
            callback=export, filename="tensor-types.txt", label="export llama.cpp overrides", width=220
        )
        deploy = [self._deploy_button(fmt, label) for fmt, label in DEPLOY_FORMATS]
        return [
            pn.Row(pn.pane.Markdown("load:", margin=(8, 10)), upload),
            pn.Row(save, export_btn),
            pn.Row(*deploy),
        ]

    def panel(self) -> pn.viewable.Viewable:
        return pn.Column(
            totals_line(self.state),
            self._history_row(),
            pn.Row(
                pn.Column(
                    pn.pane.Markdown("#### Edit", margin=(0, 10)),
                    *self._edit_controls(),
                    pn.pane.Markdown("#### Budget", margin=(0, 10)),
                    *self._budget_controls(),
                    pn.pane.Markdown("#### Files", margin=(0, 10)),
                    *self._file_controls(),
                    width=620,
                ),
                pn.Column(
                    pn.pane.Markdown("#### Current plan (later rules win)", margin=(0, 10)),
                    self._rules_table(),
                    sizing_mode="stretch_width",
                ),
                sizing_mode="stretch_width",
            ),
            sizing_mode="stretch_width",
            name="Plan",
        )
