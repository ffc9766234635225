"""Where one decode step's time goes: GPU kernels by category, and the idle gaps between them.

`step_breakdown(decoder)` times the captured step (CUDA-graph replays, CUDA events) and profiles the same
replays with torch.profiler (CUPTI records the kernels a graph launches). Kernels are put in categories by
name (`kernel_category`): the linear layers (our GEMV / GEMM, cuBLAS), attention, norms and rotary,
element-wise work and copies (residual adds, SiLU*up, embedding, argmax, cache writes). The idle time is
the step time minus the time covered by at least one kernel: launch gaps inside the graph.

If the profiler reports no kernels inside the graph replays (older CUPTI), the step function is profiled
outside the graph instead (same kernels, same order) and the result says so.
"""

from __future__ import annotations

import statistics

import torch

CATEGORIES = ("linear", "attention", "norm_rotary", "elementwise_copy")
_ATTN = ("attn", "attention", "flash", "fmha", "sdpa", "softmax")
_LINEAR = ("gemv", "gemm", "nvjet", "cutlass", "cublas", "splitk", "xmma", "matmul", "sm90_", "ampere_")
_NORM = ("rsqrt", "norm", "rotary", "rope", "mean", "pow_", "_pow", "cos", "sin", "neg")


def kernel_category(name: str) -> str:
    """The category of a GPU kernel from its name (see CATEGORIES)."""
    n = name.lower()
    if any(t in n for t in _ATTN):
        return "attention"
    if any(t in n for t in _LINEAR):
        return "linear"
    if any(t in n for t in _NORM):
        return "norm_rotary"
    return "elementwise_copy"


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (us)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def time_replays(graph: torch.cuda.CUDAGraph, n: int = 50, reps: int = 3) -> float:
    """Median ms per replay of `graph` (n back-to-back replays per CUDA-event measurement)."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n)
    return statistics.median(times)


def _kernels(run, steps: int) -> list:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def step_breakdown(decoder, prompt_ids, steps: int = 20, top: int = 10) -> dict:
    """Time per category of one captured decode step (ms), kernels per step, idle gaps.

    Args:
        decoder: a GraphDecoder in mode "graph" or "compile" (captured on first use).
        prompt_ids: prompt whose prefill sets the position the steps start from.
        steps: replays profiled (the cache must hold prompt + 2 * steps + 60 tokens).
    Returns:
        {"step_ms", "kernels_per_step", "ms": {category: ms per step, "idle": ms}, "top": [[name, ms]],
         "profiled": "graph replay" | "step outside the graph"}.
    """
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).to(decoder.device)
    decoder.prepare()
    decoder.prefill(ids)
    step_ms = time_replays(decoder.graph, n=steps, reps=1)  # warm, and advances 20 positions
    decoder.prefill(ids)
    step_ms = min(step_ms, time_replays(decoder.graph, n=steps, reps=1))
    decoder.prefill(ids)
    where = "graph replay"
    events = _kernels(decoder.graph.replay, steps)
    if len(events) < 2 * steps:
        decoder.prefill(ids)
        with torch.no_grad():
            events = _kernels(decoder._step_fn, steps)
        where = "step outside the graph"
    ms = {c: 0.0 for c in CATEGORIES}
    by_name: dict[str, float] = {}
    for e in events:
        t = e.device_time / 1e3 / steps  # us -> ms per step
        ms[kernel_category(e.name)] += t
        by_name[e.name] = by_name.get(e.name, 0.0) + t
    busy = _busy_us([(e.time_range.start, e.time_range.end) for e in events]) / 1e3 / steps
    ms = {k: round(v, 4) for k, v in ms.items()}
    ms["idle"] = round(max(0.0, step_ms - busy), 4)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {
        "step_ms": round(step_ms, 4),
        "kernels_per_step": len(events) / steps,
        "ms": ms,
        "top": [[k[:90], round(v, 4)] for k, v in ranked],
        "profiled": where,
    }
