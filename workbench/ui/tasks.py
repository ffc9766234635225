"""The app's long computations as plain functions: load, statistics, layer report, sensitivity, evaluation,
verification, chat.

Each takes what it needs (a `ModelSession`, settings) and a `report(fraction, text)` callback, calls the
core library and returns its result; nothing here reads or writes the state (`workbench/ui/adopt.py` hands
the results over, `WorkbenchState` runs these in `Job`s). `report` is the job's `ctx.report`: it fills the
progress bar from the core's progress callbacks (`workbench.progress`) and raises `JobCancelled` once the
user asked to stop, which is how a job is cancelled: cooperatively, at the next reported step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
import time

from workbench.ui.session import ModelSession, Report, shared_model


def load(source: str, report: Report):
    """(LoadedModel, {layer: (max/median |w|, kurtosis)}): the shared model and its weight outliers."""
    from workbench.model.inventory import layer_inventory
    from workbench.progress import stage
    from workbench.ui.layer_table import weight_outliers

    t0 = time.perf_counter()
    report(0.05, f"loading {source}")
    loaded = shared_model(source, report)
    report(0.6, f"loaded in {time.perf_counter() - t0:.1f} s; weight outliers for the layer table")
    return loaded, weight_outliers(loaded.model, layer_inventory(loaded.model), stage(report, 0.6, 1.0))


def statistics(session: ModelSession, text: str, n_seqs: int, seq_len: int, report: Report):
    """Activation statistics of every layer (`stats.inspect_model`, cached on disk by the core)."""
    from workbench.progress import stage
    from workbench.stats.inspection import inspect_model

    with session.use(report) as loaded:
        report(0.02, f"statistics: {n_seqs} x {seq_len} tokens of '{text}' (cached after the first run)")
        progress = stage(report, 0.02, 1.0)
        return inspect_model(loaded, text=text, n_seqs=n_seqs, seq_len=seq_len, progress=progress)


def kv_stats(session: ModelSession, text: str, n_seqs: int, seq_len: int, report: Report):
    """K (pre / post RoPE) and V statistics of every attention block (`stats.kv.kv_statistics`, cached on
    disk by the core)."""
    from workbench.progress import stage
    from workbench.stats.kv import kv_statistics

    with session.use(report) as loaded:
        report(0.02, f"K/V statistics: {n_seqs} x {seq_len} tokens of '{text}' (cached after the first run)")
        return kv_statistics(loaded, text, n_seqs, seq_len, progress=stage(report, 0.02, 1.0))


def layer_details(loaded, name: str, grid_spec: str | None, specs: list[str], inspection, report: Report):
    """The Distributions tab's report for one layer (`workbench.measure.layer_report`, on the shared
    model)."""
    from workbench.measure.layer_report import layer_report

    report(0.1, f"statistics of {name}")
    return layer_report(loaded, name, grid_spec, specs, inspection=inspection)


# Share of the scan bar each calibration stage fills, in the order they run (the last 15%).
CALIBRATION_SHARES = (("uniform", 0.85, 0.90), ("check", 0.90, 0.95), ("refine", 0.95, 1.0))


def calibration_fraction(msg: str) -> float | None:
    """Bar position of a calibration message "calibrating: <stage> ... (i/n)" (`sensitivity._calibrate`):
    the stage's share, filled by i/n; 0.85 for another calibrating message, None for a setup message."""
    if not msg.startswith("calibrating"):
        return None
    body = msg.removeprefix("calibrating: ")
    m = re.search(r"\((\d+)/(\d+)\)\s*$", msg)
    for stage, lo, hi in CALIBRATION_SHARES:
        if body.startswith(stage):
            return lo + (hi - lo) * ((int(m[1]) - 1) / int(m[2]) if m else 0.0)
    return 0.85


def _heartbeat(report: Report, text: str, stop: threading.Event) -> threading.Thread:
    """Publish elapsed time every second while a core step without progress hooks runs."""
    t0 = time.perf_counter()

    def beat():
        while not stop.wait(1.0):
            try:
                report(None, f"{text} ({time.perf_counter() - t0:.0f} s)")
            except Exception:  # the job was cancelled: its own thread stops at its next step
                return

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    return th


def inspection_grams(inspection, cfg: dict) -> dict | None:
    """The statistics' Gram matrices when they cover the scan's calibration tokens exactly, else None."""
    if inspection is None:
        return None
    st = inspection.settings
    same = (st.get("text"), st.get("n_seqs"), st.get("seq_len"), st.get("seed")) == (
        cfg["text"],
        cfg["calib_seqs"],
        cfg["calib_seq_len"],
        0,
    )
    grams = {n: a.gram for n, a in inspection.activations.items() if a.gram is not None}
    return grams if same and grams else None


def _sensitivity_path(loaded, specs: list[str], settings: dict):
    from workbench.paths import cache_dir

    key = json.dumps({"specs": specs, **settings}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_dir("sensitivity") / f"{loaded.description.fingerprint}-{digest}.json"


def sensitivity(
    session: ModelSession, specs: list[str], method: str, cfg: dict, grams: dict | None, report: Report
):
    """Sensitivity table (`sensitivity.sensitivity_scan`), saved and resumed from the cache.

    `cfg`: the scan settings (`defaults.scan_settings`); `grams`: the statistics' Gram matrices of the same
    calibration tokens, or None (then collected, or read from the Gram cache). The bar fills over the setup
    (Grams, Fisher pass: the first 25%, elapsed seconds meanwhile), layer by layer, then over the
    calibration (the last 15%: uniform plans, the check, the refinement, each its own share).
    """
    from workbench.measure.sensitivity import calibration_stage, sensitivity_scan
    from workbench.model.inventory import layer_inventory

    with session.use(report) as loaded:
        n_layers = len(layer_inventory(loaded.model))
        stage = calibration_stage(method, None)  # a table of an older calibration is not resumed
        path = _sensitivity_path(loaded, specs, {"method": method, "calibrate": stage, **cfg})
        done, beats, steps = [0], [], iter([0.02, 0.2])

        def quiet() -> None:
            for beat in beats:
                beat.set()

        def on_setup(msg: str) -> None:
            quiet()
            note = " (reusing the statistics' Gram matrices)" if grams and "Fisher" in msg else ""
            f = calibration_fraction(msg)
            report(next(steps, 0.25) if f is None else f, msg + note)
            beats.append(threading.Event())
            _heartbeat(report, msg + note, beats[-1])

        def on_layer(name: str) -> None:
            quiet()
            done[0] += 1
            report(0.25 + 0.6 * done[0] / n_layers, f"{done[0]}/{n_layers} layers scored ({name})")

        kw = dict(out=path, grams=grams, progress=False, on_layer=on_layer, on_setup=on_setup)
        try:
            return sensitivity_scan(loaded, specs, method, **kw, **cfg)
        finally:
            quiet()


def verification(session: ModelSession, table, resolved, ev: dict, report: Report):
    """Measure the plan and its uniform neighbours in size (`verify.verify_plan`, cached evaluations);
    `ev`: text, seq_len, max_tokens of the evaluation. The bar fills one measured plan at a time."""
    from workbench.measure.verify import verify_plan

    with session.use(report) as loaded:

        def step(i: int, n: int, what: str) -> None:
            report(i / n, f"measuring {what} ({i + 1}/{n}) on {ev['max_tokens']} tokens of '{ev['text']}'")

        return verify_plan(loaded, table, resolved, on_step=step, **ev)


def evaluation(session: ModelSession, resolved, ev: dict, calibration: dict, report: Report):
    """Perplexity / KL / top-1 of `resolved` (None: the reference) (`evaluate.evaluate`).

    `ev`: text, seq_len, max_tokens; `calibration`: text, n_seqs, seq_len of the Gram matrices that
    gptq/awq layers need. The bar fills over the Grams (first 10%) and the evaluation's own steps.
    """
    from workbench.measure.evaluate import evaluate
    from workbench.measure.simulate import calibration_grams
    from workbench.progress import stage

    with session.use(report) as loaded:
        grams, start = None, 0.0
        if resolved and resolved.gram_layers:
            need, c, start = resolved.gram_layers, calibration, 0.1
            report(0.0, f"calibration Gram matrices for {len(need)} gptq/awq layers")
            progress = stage(report, 0.0, start)
            grams = calibration_grams(loaded, need, c["text"], c["n_seqs"], c["seq_len"], progress=progress)
        return evaluate(loaded, resolved, **ev, grams=grams, progress=stage(report, start, 1.0))


def chat(session: ModelSession, prompt: str, max_new_tokens: int, resolved, plan_key: str, report: Report):
    """Greedy generation with the reference and the quantized model (real QuantLinear layers) side by side;
    returns one chat-log entry (texts, speeds, layers that fell back)."""
    from workbench.runtime.apply import apply_plan
    from workbench.runtime.decode import select_device

    device, note = select_device("auto")
    tok = session.loaded.tokenizer
    ids = tok.prompt_ids(prompt)
    with session.use(report) as loaded:
        ref_model = loaded.model

        def build():
            # on a CPU the packed layers would re-dequantize every weight at every token: dequantize once
            backend = "auto" if device.type == "cuda" else "dequantized"
            what = "real low-bit layers" if backend == "auto" else "weights dequantized once"
            report(0.1, f"quantizing a copy of the model with the current plan ({what})")
            qmodel = copy.deepcopy(ref_model).to(device)
            return qmodel, apply_plan(qmodel, resolved, warn=False, backend=backend)

        qmodel, applied = session.quantized(plan_key, build)
        ref_model.to(device)
        try:
            report(0.4, f"reference model generating on {device}")
            ref, ref_cache, _ = _generate(ref_model, ids, max_new_tokens, tok.eos_token_id, None)
            report(0.7, f"quantized model generating on {device}")
            qnt, q_cache, kv_note = _generate(qmodel, ids, max_new_tokens, tok.eos_token_id, resolved.kv)
        finally:
            ref_model.to("cpu")
    return {
        "prompt": prompt,
        "device": str(device),
        "note": note or "",
        "reference": tok.decode(ref.tokens),
        "quantized": tok.decode(qnt.tokens),
        "ref_tokens_per_s": ref.decode_tokens_per_s,
        "q_tokens_per_s": qnt.decode_tokens_per_s,
        "mode": qnt.mode,
        "quantized_layers": len(applied.layers),
        "fallback_layers": len(applied.fallback),
        "fallback_reasons": sorted(set(applied.fallback.values())),
        "ref_cache_bytes": ref_cache,
        "q_cache_bytes": q_cache,
        "kv_note": kv_note,
    }


def _generate(model, ids, max_new_tokens: int, eos: int | None, kv: dict | None):
    """(DecodeResult, K/V cache bytes or None, note) of one greedy generation. The plan's K/V specs make
    the decoder store the cache quantized (the fast path); a model that path cannot run still chats, with
    the bf16 cache and a note saying why (the simulation in Measure applies the specs either way)."""
    from workbench.errors import WorkbenchError
    from workbench.runtime.decode import make_decoder

    L = max(64, len(ids) + max_new_tokens + 1)
    quant_kv = any(s.k is not None or s.v is not None for s in (kv or {}).values())
    note = ""
    try:
        dec = make_decoder(model, max_cache_len=L, kv=kv if quant_kv else None)
    except WorkbenchError as exc:
        if not quant_kv:
            raise
        dec, note = make_decoder(model, max_cache_len=L), f"K/V cache kept in full precision here: {exc}"
    res = dec.generate(ids, max_new_tokens, eos)
    note = note or next((n for n in res.notes if "KV cache" in n), "")
    return res, (dec.cache_bytes() if hasattr(dec, "cache_bytes") else None), note
