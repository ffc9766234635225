"""The app's long computations as background jobs: load, statistics, sensitivity, evaluation, chat.

Each function builds a `Job` whose thread calls the core library and hands the result to the state. A
loaded model is shared by every session of one server process (read-only: inventory, weights for the
distribution charts); jobs that run the model (statistics hooks, fake quantization, generation) use a
private copy per session, made on first need, so two browser tabs never race on one nn.Module.
"""

from __future__ import annotations

import copy
import threading
import time

from workbench.ui.jobs import Job, JobContext

_SHARED: dict[str, object] = {}
_SHARED_LOCK = threading.Lock()


def shared_model(source: str, ctx: JobContext | None = None):
    """Load `source` once per process (later sessions reuse it)."""
    from workbench.loading import load_model

    with _SHARED_LOCK:
        if source not in _SHARED:
            if ctx is not None:
                ctx.report(0.1, f"loading {source} (the default model converts once, ~20 s, then is cached)")
            _SHARED[source] = load_model(source, progress=False)
        return _SHARED[source]


def private_model(state):
    """This session's own copy of the model, for jobs that hook or modify modules."""
    from workbench.loading import LoadedModel

    if state._private_model is None:
        base = state.loaded
        state._private_model = LoadedModel(
            model=copy.deepcopy(base.model), tokenizer=base.tokenizer, description=base.description
        )
    return state._private_model


def load_job(state, source: str) -> Job:
    """Load a model (shared cache) and install it in `state`."""

    def work(ctx: JobContext):
        t0 = time.perf_counter()
        ctx.report(0.05, f"loading {source}")
        loaded = shared_model(source, ctx)
        ctx.report(0.9, f"loaded in {time.perf_counter() - t0:.1f} s; building the layer table")
        return loaded

    def failed(message: str) -> None:
        def show():
            state.phase = "error"
            state.notify(f"could not load '{source}': {message}", "error")

        state.run_ui(show)

    return Job(
        f"load {source}",
        work,
        on_done=lambda loaded: state.run_ui(lambda: state.set_model(loaded)),
        on_error=failed,
    )


def stats_job(state, text: str, n_seqs: int, seq_len: int) -> Job:
    """Activation statistics of every layer (`stats.inspect_model`, cached on disk by the core)."""

    def work(ctx: JobContext):
        from workbench.stats.inspection import inspect_model

        ctx.report(0.0, f"waiting for the model ({n_seqs} x {seq_len} tokens of '{text}')")
        with state._model_lock:
            ctx.report(
                0.05,
                f"collecting activation statistics: {n_seqs} x {seq_len} tokens of '{text}' "
                "(cached after the first run)",
            )
            return inspect_model(
                private_model(state), text=text, n_seqs=n_seqs, seq_len=seq_len, progress=False
            )

    def done(inspection):
        def adopt():
            state.inspection = inspection
            state.details = None
            state.notify(
                f"activation statistics ready ({'from cache' if inspection.from_cache else 'computed'}"
                f", {n_seqs} x {seq_len} tokens of '{text}')",
                "success",
            )

        state.run_ui(adopt)

    return Job(
        "statistics",
        work,
        on_done=done,
        on_error=lambda m: state.run_ui(lambda: state.notify(f"statistics failed: {m}", "error")),
    )


def details_job(state, name: str, grid_spec: str | None, specs: list[str]) -> Job:
    """The Distributions tab's report for one layer (`workbench.layer_report`)."""
    inspection = state.inspection

    def work(ctx: JobContext):
        from workbench.layer_report import layer_report

        ctx.report(0.1, f"statistics of {name}")
        return layer_report(state.loaded, name, grid_spec, specs, inspection=inspection)

    def done(report):
        state.run_ui(lambda: setattr(state, "details", report))

    return Job(
        f"layer {name.removeprefix('model.')}",
        work,
        on_done=done,
        on_error=lambda m: state.run_ui(lambda: state.notify(f"layer statistics failed: {m}", "error")),
    )
