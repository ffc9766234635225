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
from pathlib import Path

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


def load_job(state, source: str, restore: str = "default") -> Job:
    """Load a model (shared cache) and install it in `state`; on failure the model box shows `restore`."""

    def work(ctx: JobContext):
        from workbench.inventory import layer_inventory
        from workbench.ui.layer_table import weight_outliers

        t0 = time.perf_counter()
        ctx.report(0.05, f"loading {source}")
        loaded = shared_model(source, ctx)
        ctx.report(0.9, f"loaded in {time.perf_counter() - t0:.1f} s; weight outliers for the layer table")
        return loaded, weight_outliers(loaded.model, layer_inventory(loaded.model))

    def failed(message: str) -> None:
        def show():
            # the model box goes back to the model still loaded (or the default), not the bad path
            state.source = restore
            state.phase = "ready" if state.loaded is not None else "error"
            state.notify(f"could not load '{source}': {message}", "error")

        state.run_ui(show)

    return Job(
        f"load {Path(source).name or source}",
        work,
        on_done=lambda result: state.run_ui(lambda: state.set_model(*result)),
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
            state.refresh()  # the layer table's activation-outlier column
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


def _heartbeat(ctx: JobContext, text: str, stop: threading.Event) -> threading.Thread:
    """Publish elapsed time every second while a core call without progress hooks runs."""
    t0 = time.perf_counter()

    def beat():
        while not stop.wait(1.0):
            try:
                ctx.report(None, f"{text} ({time.perf_counter() - t0:.0f} s)")
            except Exception:
                return

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    return th


def _sensitivity_path(loaded, specs: list[str], settings: dict):
    import hashlib
    import json

    from workbench.paths import cache_dir

    key = json.dumps({"specs": specs, **settings}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_dir("sensitivity") / f"{loaded.description.fingerprint}-{digest}.json"


def sensitivity_job(state, specs: list[str], method: str, cfg: dict, grams: dict | None = None) -> Job:
    """Sensitivity table (`sensitivity.sensitivity_scan`), saved and resumed from the cache.

    `cfg`: the scan settings (`defaults.scan_settings`); `grams`: the statistics' Gram matrices of the same
    calibration tokens, or None (then collected, or read from the Gram cache). The bar fills over the setup
    (Grams, Fisher pass: the first 25%), layer by layer, then over the calibration of the costs on
    measured uniform plans (the last 15%).
    """
    n_layers = len(state.layers)
    what = {"fisher": "Fisher-weighted output error, nats of KL", "proxy": "relative output error"}

    def work(ctx: JobContext):
        from workbench.sensitivity import calibration_stage, sensitivity_scan

        ctx.report(0.0, "waiting for the model")
        with state._model_lock:
            loaded = private_model(state)
            stage = calibration_stage(method, None)  # a table of an older calibration is not resumed
            path = _sensitivity_path(loaded, specs, {"method": method, "calibrate": stage, **cfg})
            done, beats = [0], []
            steps = iter([0.02, 0.2])

            def quiet() -> None:
                for beat in beats:
                    beat.set()

            def on_setup(msg: str) -> None:
                quiet()
                note = " (reusing the statistics' Gram matrices)" if grams and "Fisher" in msg else ""
                ctx.report(0.85 if msg.startswith("calibrating") else next(steps, 0.25), msg + note)
                beats.append(threading.Event())
                _heartbeat(ctx, msg + note, beats[-1])

            def on_layer(name: str) -> None:
                quiet()
                done[0] += 1
                ctx.report(0.25 + 0.6 * done[0] / n_layers, f"{done[0]}/{n_layers} layers scored ({name})")

            kw = dict(out=path, grams=grams, progress=False, on_layer=on_layer, on_setup=on_setup)
            try:
                return sensitivity_scan(loaded, specs, method, **kw, **cfg)
            finally:
                quiet()

    def done(table):
        def adopt():
            state.sensitivity = table
            state.verification = None
            state.refresh()
            state.notify(
                f"sensitivity table ready: {len(table.layers)} layers x {len(table.specs)} specs "
                f"({table.method}: {what.get(table.method, 'measured KL')})",
                "success",
            )

        state.run_ui(adopt)

    return Job(
        "sensitivity",
        work,
        on_done=done,
        on_error=lambda m: state.run_ui(lambda: state.notify(f"sensitivity failed: {m}", "error")),
    )


def verify_job(state, resolved, label: str, ev: dict) -> Job:
    """Measure the plan and its uniform neighbours in size (`verify.verify_plan`, cached evaluations);
    `ev`: text, seq_len, max_tokens of the evaluation."""
    table = state.sensitivity

    def work(ctx: JobContext):
        from workbench.verify import verify_plan

        ctx.report(0.0, "waiting for the model")
        with state._model_lock:
            loaded = private_model(state)

            def step(i: int, n: int, what: str) -> None:
                tokens = f"{ev['max_tokens']} tokens of '{ev['text']}'"
                ctx.report(i / n, f"measuring {what} ({i + 1}/{n}) on {tokens}")

            return verify_plan(loaded, table, resolved, on_step=step, **ev)

    def done(v):
        def adopt():
            state.verification = v
            kind = "warning" if v.beaten_by() else "success"
            state.notify(f"verified {label}: measured KL {v.plan.kl:.4g} - {v.verdict()}", kind)

        state.run_ui(adopt)

    return Job(
        f"verify {label}",
        work,
        on_done=done,
        on_error=lambda m: state.run_ui(lambda: state.notify(f"verification failed: {m}", "error")),
    )


def evaluate_job(
    state, resolved, label: str, plan_json: str, text: str, seq_len: int, max_tokens: int
) -> Job:
    """Perplexity / KL / top-1 of a plan (`evaluate.evaluate`); the result row is appended to the state."""
    totals = state.totals
    reference = resolved is None

    def work(ctx: JobContext):
        from workbench.evaluate import evaluate
        from workbench.simulate import calibration_grams

        ctx.report(0.0, "waiting for the model")
        with state._model_lock:
            loaded = private_model(state)
            grams = None
            if resolved:
                need = resolved.gram_layers
                if need:
                    ctx.report(0.05, f"calibration Gram matrices for {len(need)} gptq/awq layers")
                    cfg = state.calibration_settings()
                    grams = calibration_grams(
                        loaded, need, cfg["text"], cfg["n_seqs"], cfg["seq_len"], progress=False
                    )
            stop = threading.Event()
            _heartbeat(ctx, f"evaluating {label} on {max_tokens} tokens of '{text}'", stop)
            try:
                return evaluate(
                    loaded,
                    resolved,
                    text=text,
                    seq_len=seq_len,
                    max_tokens=max_tokens,
                    grams=grams,
                    progress=False,
                )
            finally:
                stop.set()

    def done(result):
        row = {
            "plan": label,
            "MB": round(totals.bf16_mb if reference else totals.mb, 4),
            "avg bits": 16.0 if reference else round(totals.avg_bits, 3),
            "ppl": round(result.ppl, 4),
            "ref ppl": round(result.ref_ppl, 4),
            "KL (nats)": float(f"{result.kl:.4g}"),  # 4 significant digits
            "top-1": round(result.top1, 4),
            "tokens": result.n_tokens,
            "text": text,
            "seconds": round(result.seconds, 1),
            "plan_json": plan_json,
        }

        def adopt():
            state.evaluations = state.evaluations + [row]
            state.notify(
                f"evaluated {label}: ppl {result.ppl:.3f} (reference {result.ref_ppl:.3f}), "
                f"KL {result.kl:.4g} nats, top-1 {100 * result.top1:.2f}%",
                "success",
            )

        state.run_ui(adopt)

    return Job(
        f"evaluate {label}",
        work,
        on_done=done,
        on_error=lambda m: state.run_ui(
            lambda: state.notify(f"evaluation of {label} failed: {m} (the plan is unchanged)", "error")
        ),
    )


def chat_job(state, prompt: str, max_new_tokens: int, resolved, plan_key: str) -> Job:
    """Greedy generation with the reference and the quantized model (real QuantLinear layers) side by side."""

    def work(ctx: JobContext):
        from workbench.runtime.apply import apply_plan
        from workbench.runtime.decode import greedy_generate, select_device

        device, note = select_device("auto")
        tok = state.loaded.tokenizer
        ids = tok.prompt_ids(prompt)
        with state._model_lock:
            ref_model = private_model(state).model
            cached = state._chat_model
            if cached is None or cached[0] != plan_key:
                # on a CPU the packed layers would re-dequantize every weight at every token: dequantize once
                backend = "auto" if device.type == "cuda" else "dequantized"
                what = "real low-bit layers" if backend == "auto" else "weights dequantized once"
                ctx.report(0.1, f"quantizing a copy of the model with the current plan ({what})")
                qmodel = copy.deepcopy(ref_model).to(device)
                report = apply_plan(qmodel, resolved, warn=False, backend=backend)
                state._chat_model = cached = (plan_key, qmodel, report)
            _, qmodel, report = cached
            ref_model.to(device)
            try:
                ctx.report(0.4, f"reference model generating on {device}")
                ref = greedy_generate(ref_model, ids, max_new_tokens, eos_token_id=tok.eos_token_id)
                ctx.report(0.7, f"quantized model generating on {device}")
                qnt = greedy_generate(qmodel, ids, max_new_tokens, eos_token_id=tok.eos_token_id)
            finally:
                ref_model.to("cpu")
        fallback = len(report.fallback)
        return {
            "prompt": prompt,
            "device": str(device),
            "note": note or "",
            "reference": tok.decode(ref.tokens),
            "quantized": tok.decode(qnt.tokens),
            "ref_tokens_per_s": ref.decode_tokens_per_s,
            "q_tokens_per_s": qnt.decode_tokens_per_s,
            "mode": qnt.mode,
            "quantized_layers": len(report.layers),
            "fallback_layers": fallback,
            "fallback_reasons": sorted(set(report.fallback.values())),
        }

    def done(result):
        state.run_ui(lambda: setattr(state, "chat_log", state.chat_log + [result]))

    return Job(
        "chat",
        work,
        on_done=done,
        on_error=lambda m: state.run_ui(lambda: state.notify(f"chat failed: {m}", "error")),
    )
