"""The Transforms tab's small state: the last before/after comparison, computed in a job.

Kept apart from ui/state.py: it only reads `state.loaded` and reports through `state.notify` / `add_job`.
"""

from __future__ import annotations

import param

from workbench.ui.jobs import Job, JobContext


class TransformCompare(param.Parameterized):
    """`run(layer, preset)` computes `workbench.transform.compare.compare_transform` in a job -> `result`."""

    state = param.Parameter(doc="WorkbenchState")
    result = param.Parameter(default=None, doc="InputComparison of the last run")

    def run(self, layer: str, preset: str, wait: bool = False, **settings) -> Job:
        """Start the comparison of `layer`'s input before / after the `preset` transform (`PRESETS`)."""
        state = self.state
        if state.loaded is None:
            from workbench.errors import WorkbenchError

            raise WorkbenchError("no model loaded yet")
        loaded = state.loaded

        def work(ctx: JobContext):
            from workbench.transform.compare import compare_transform

            ctx.report(0.1, f"{preset} on a copy, then {layer}'s input before and after")
            return compare_transform(loaded, layer, preset, **settings)

        def done(result):
            state.run_ui(lambda: setattr(self, "result", result))

        def failed(message: str):
            state.run_ui(lambda: state.notify(f"transform comparison failed: {message}", "error"))

        job = state.add_job(Job(f"transform {preset}", work, on_done=done, on_error=failed))
        if wait:
            job.join()
        return job
