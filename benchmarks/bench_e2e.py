"""End-to-end batch-1 greedy decode on the GPU: bf16 vs uniform int4_g128 vs a mixed plan.

The model is Llama-3-8B-shaped (hidden 4096, FFN 14336, 32 blocks, 32 heads / 8 KV heads, vocab 128256) with
random bf16 weights built on the device (the real weights cannot travel to the GPU machine); decode speed
depends only on shapes. Quantization is round-to-nearest on the GPU (GPTQ would not change the timing).
Every variant runs through the same harness (`workbench.runtime.decode.StaticDecoder`): static KV cache,
one-token step captured in a CUDA graph ("graph"), optionally after torch.compile ("compile").

For each variant the table reports decode tokens/s (median of repeated runs, prefill excluded), the bytes one
token must read (every linear's packed weights + scales + zeros, norms, and the KV cache at the mean context)
and the memory roofline = measured copy bandwidth / those bytes. The eager baselines show where plain
decoding loses its time: HF `generate` (dynamic cache), the same static-cache step without a graph, and a
torch.profiler count of kernel launches and GPU-busy time per eager step.

Run: `workbench bench e2e [--json]` or `python benchmarks/bench_e2e.py [--quick] [--out results.json]`.
"""

from __future__ import annotations

import argparse
import json as jsonlib
import statistics
import sys
import time

import torch

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def mixed_plan(n_layers: int) -> dict:
    """A mixed plan touching every kernel: edge blocks and lm_head at int8, attention output fp8, values
    int8, down projections 3-bit, the middle third's up projections 2-bit, one q_proj kept in bf16, the rest
    int4_g128 (later rules win)."""
    lo, hi = n_layers // 3, max(n_layers // 3 + 1, 2 * n_layers // 3)
    edges = "|".join(str(i) for i in sorted({0, 1, n_layers - 2, n_layers - 1}))
    mid = "|".join(str(i) for i in range(lo, hi))
    return {
        "format": "workbench.plan",
        "version": 1,
        "default": "int4_g128",
        "rules": [
            {"match": "role:o", "spec": "fp8_e4m3"},
            {"match": "role:v", "spec": "int8_ch"},
            {"match": "role:down", "spec": "int3_g128"},
            {"match": rf"re:model\.layers\.({mid})\.mlp\.up_proj", "spec": "int2_g64"},
            {"match": rf"re:model\.layers\.({edges})\..*", "spec": "int8_ch"},
            {"match": f"model.layers.{n_layers // 2}.self_attn.q_proj", "spec": "bf16"},
            {"match": "lm_head", "spec": "int8_ch"},
        ],
    }


def build_model(cfg: dict, device: str = "cuda", seed: int = 0):
    """LlamaForCausalLM of `cfg` with random bf16 weights (HF init: normal, std 0.02), built on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of `reps` timed copies."""
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    y = torch.empty_like(x)
    times = []
    for i in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        if i >= 2:
            times.append(a.elapsed_time(b) / 1e3)
    del x, y
    return 2 * nbytes / statistics.median(times)


def bytes_per_token(model, context: int) -> int:
    """Bytes one decode step must read: linear weights (packed + metadata), norms, K/V cache at `context`."""
    from workbench.inventory import is_quantizable
    from workbench.runtime.qlinear import QuantLinear

    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += mod.memory_bytes()
        elif is_quantizable(mod) or "Norm" in type(mod).__name__:
            total += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    total += 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * 2
    return total


def time_decoder(model, prompt: list[int], n_tokens: int, mode: str, reps: int = 3) -> dict:
    """Median decode tokens/s of the StaticDecoder in `mode` (after one warm-up generation)."""
    from workbench.runtime.decode import StaticDecoder

    dec = StaticDecoder(model, max_cache_len=len(prompt) + n_tokens + 8, mode=mode)
    t0 = time.perf_counter()
    dec.generate(prompt, 8)
    setup = time.perf_counter() - t0
    runs = [dec.generate(prompt, n_tokens) for _ in range(reps)]
    tps = [r.decode_tokens_per_s for r in runs]
    out = {
        "mode": mode,
        "setup_s": round(setup, 2),
        "tokens_per_s": statistics.median(tps),
        "runs_tokens_per_s": tps,
        "prefill_ms": 1e3 * statistics.median(r.prefill_s for r in runs),
        "first_tokens": runs[0].tokens[:8],
    }
    del dec
    return out


def eager_breakdown(model, prompt: list[int], n_tokens: int = 24) -> dict:
    """Where eager decode time goes: HF generate, static-cache eager loop, profiler of eager steps."""
    from torch.profiler import ProfilerActivity, profile

    from workbench.runtime.decode import StaticDecoder

    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)  # warm-up
        times = {}
        for n in (1, n_tokens + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            torch.cuda.synchronize()
            times[n] = time.perf_counter() - t0
    hf_tps = n_tokens / (times[n_tokens + 1] - times[1])
    dec = StaticDecoder(model, max_cache_len=len(prompt) + n_tokens + 16, mode="eager")
    dec.generate(prompt, 4)
    static_tps = dec.generate(prompt, n_tokens).decode_tokens_per_s
    # profile 8 eager static-cache steps
    dec.generate(prompt, 2)
    steps = 8
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                dec._step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_busy = sum(e.device_time for e in kernels) / 1e6 / steps  # device_time in us
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 1e3 / steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    return {
        "hf_generate_tokens_per_s": hf_tps,
        "static_eager_tokens_per_s": static_tps,
        "profiled_step_wall_ms": wall * 1e3,
        "profiled_step_gpu_busy_ms": gpu_busy * 1e3,
        "kernels_per_step": len(kernels) / steps,
        "top_kernels_ms_per_step": [[k[:60], round(v, 3)] for k, v in top],
        "note": "profiler adds host overhead; wall is measured under the profiler",
    }


def bench_variant(
    name: str, cfg: dict, plan, modes, n_tokens: int, prompt: list[int], bandwidth: float, breakdown: bool
) -> dict:
    from workbench.plan import Plan
    from workbench.runtime.apply import apply_plan
    from workbench.runtime.memory import model_memory

    model = build_model(cfg)
    report = None
    t0 = time.perf_counter()
    if plan is not None:
        report = apply_plan(model, Plan.from_json(plan) if isinstance(plan, dict) else plan)
    quant_s = time.perf_counter() - t0
    mem = model_memory(model)
    bpt = bytes_per_token(model, len(prompt) + n_tokens // 2)
    res = {
        "variant": name,
        "memory_bytes": mem.total_bytes,
        "bytes_per_token": bpt,
        "roofline_tokens_per_s": bandwidth / bpt,
        "quantize_s": round(quant_s, 1),
        "layers": len(report.layers) if report else 0,
        "fallback": len(report.fallback) if report else 0,
        "modes": {},
    }
    if breakdown:
        try:
            res["eager"] = eager_breakdown(model, prompt)
        except Exception as exc:  # report and carry on: the graph numbers matter most
            res["eager"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    for mode in modes:
        try:
            res["modes"][mode] = time_decoder(model, prompt, n_tokens, mode)
        except Exception as exc:
            res["modes"][mode] = {"mode": mode, "error": f"{type(exc).__name__}: {exc}"[:800]}
        print(f"  {name} {mode}: {res['modes'][mode]}", file=sys.stderr, flush=True)
    del model
    torch.cuda.empty_cache()
    return res


def run(
    json: bool = False,
    quick: bool = False,
    modes=("graph", "compile"),
    n_tokens: int = 128,
    out: str | None = None,
    breakdown: bool = True,
    variants=("bf16", "int4_g128", "mixed"),
) -> dict:
    """Benchmark the variants and print a table; returns the results (also written to `out` as JSON)."""
    cfg = dict(LLAMA3_8B, num_hidden_layers=4) if quick else dict(LLAMA3_8B)
    plans = {
        "bf16": None,
        "int4_g128": {"format": "workbench.plan", "version": 1, "default": "int4_g128"},
        "mixed": mixed_plan(cfg["num_hidden_layers"]),
    }
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg["vocab_size"], (32,), generator=g).tolist()
    bw = copy_bandwidth()
    import transformers

    results = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "copy_bandwidth_TBps": bw / 1e12,
        "config": cfg,
        "n_tokens": n_tokens,
        "prompt_tokens": 32,
        "variants": [],
    }
    for v in variants:
        results["variants"].append(
            bench_variant(
                v,
                cfg,
                plans[v],
                modes,
                n_tokens,
                prompt,
                bw,
                breakdown=breakdown and v in ("bf16", "int4_g128"),
            )
        )
        if out:
            with open(out, "w") as fh:
                jsonlib.dump(results, fh, indent=2)
    if json:
        print(jsonlib.dumps(results))
    else:
        print_table(results)
    return results


def print_table(results: dict) -> None:
    base = {}
    for v in results["variants"]:
        for m, r in v["modes"].items():
            if v["variant"] == "bf16" and "tokens_per_s" in r:
                base[m] = r["tokens_per_s"]
    print(
        f"\n{results['device']}  {results['date']}  copy bandwidth {results['copy_bandwidth_TBps']:.2f} TB/s"
    )
    print(
        f"{'variant':<10} {'mode':<8} {'MB/token':>9} {'tok/s':>8} {'ms/tok':>7} {'roofline':>9} "
        f"{'%roof':>6} "
        f"{'x bf16':>7}"
    )
    for v in results["variants"]:
        for m, r in v["modes"].items():
            if "tokens_per_s" not in r:
                print(f"{v['variant']:<10} {m:<8} error: {r.get('error', '')[:80]}")
                continue
            tps = r["tokens_per_s"]
            ratio = tps / base[m] if m in base else float("nan")
            print(
                f"{v['variant']:<10} {m:<8} {v['bytes_per_token'] / 1e6:>9.0f} {tps:>8.1f} {1e3 / tps:>7.2f} "
                f"{v['roofline_tokens_per_s']:>9.0f} {100 * tps / v['roofline_tokens_per_s']:>5.0f}% "
                f"{ratio:>6.2f}x"
            )
        if "eager" in v and "hf_generate_tokens_per_s" in v["eager"]:
            e = v["eager"]
            print(
                f"{v['variant']:<10} eager: HF generate "
                f"{e['hf_generate_tokens_per_s']:.1f} tok/s, static eager "
                f"{e['static_eager_tokens_per_s']:.1f} tok/s, {e['kernels_per_step']:.0f} kernels/step, "
                f"GPU busy {e['profiled_step_gpu_busy_ms']:.2f} of {e['profiled_step_wall_ms']:.2f} ms"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 blocks instead of 32")
    p.add_argument("--modes", default="graph,compile")
    p.add_argument("--variants", default="bf16,int4_g128,mixed")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--out", default=None, help="JSON output path")
    a = p.parse_args()
    run(
        quick=a.quick,
        modes=tuple(a.modes.split(",")),
        n_tokens=a.tokens,
        out=a.out,
        breakdown=not a.no_breakdown,
        variants=tuple(a.variants.split(",")),
    )


if __name__ == "__main__":
    main()
