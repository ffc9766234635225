"""End-to-end batch-1 greedy decode on the GPU: bf16, uniform int4_g128 and int8_ch, and a mixed plan.

The model is Llama-3-8B-shaped (hidden 4096, FFN 14336, 32 blocks, 32 heads / 8 KV heads, vocab 128256) with
random bf16 weights built on the device (the real weights cannot travel to the GPU machine); decode speed
depends only on shapes. Quantization is round-to-nearest on the GPU (GPTQ would not change the timing).

Every variant runs the same decoders (`workbench.runtime.decode.make_decoder`): path "hf" is the transformers
model behind a StaticCache (the reference), path "fast" is `workbench.runtime.fastpath` (fused q/k/v and
gate/up, attention over the filled cache only, compiled per block); mode "graph" captures the one-token step
in a CUDA graph, "compile" runs torch.compile first. For each run: decode tokens/s (median of 3 generations,
prefill excluded), % of the memory roofline (copy bandwidth / bytes one token reads: every linear's packed
weights + scales + zeros, norms, the KV cache at the mean context), x bf16 in the same path and mode, and the
step breakdown (`workbench.runtime.profile.step_breakdown`: linear / attention / norms+rotary /
element-wise+copies / idle gaps, ms per step) beside the linears' own roofline (their bytes / bandwidth).
Prefill: prompt -> first token on the fast path (tensor-core GEMM for more than 4 rows) at 16..2,048 tokens.

Run: `workbench bench e2e [--json] [--quick]` or `python benchmarks/bench_e2e.py [--layers 4] [--out F]`.
"""

from __future__ import annotations

import argparse
import json as jsonlib
import statistics
import sys
import time

import torch

from workbench.presets import LLAMA3_8B


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
    from workbench.model.inventory import is_quantizable
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


def linear_bytes(model) -> int:
    """Bytes of every linear layer's weights (packed + scales + zeros, or the bf16 matrix)."""
    from workbench.model.inventory import is_quantizable
    from workbench.runtime.qlinear import QuantLinear

    mods = [m for m in model.modules() if isinstance(m, QuantLinear) or is_quantizable(m)]
    return sum(b.numel() * b.element_size() for m in mods for b in (*m.parameters(False), *m.buffers(False)))


def time_decoder(dec, prompt: list[int], n_tokens: int, reps: int = 3) -> dict:
    """Median decode tokens/s of a decoder (after one warm-up generation that captures the step)."""
    t0 = time.perf_counter()
    dec.generate(prompt, 8)
    setup = time.perf_counter() - t0
    runs = [dec.generate(prompt, n_tokens) for _ in range(reps)]
    tps = [r.decode_tokens_per_s for r in runs]
    return {
        "setup_s": round(setup, 2),
        "tokens_per_s": statistics.median(tps),
        "runs_tokens_per_s": tps,
        "first_tokens": runs[0].tokens[:16],
        "notes": runs[0].notes,
    }


def prefill_times(dec, lengths, vocab: int, reps: int = 5) -> dict:
    """Median prefill ms (prompt -> first token, synchronized) and prompt tokens/s for each length, with
    the fastest rep (``min_ms``: short prompts are host bound, so the spread is the host's)."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for T in lengths:
        ids = torch.randint(0, vocab, (T,), generator=g).cuda()
        dec.prefill(ids)  # warm-up (kernel compiles for this M)
        ts = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dec.prefill(ids)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(ts)
        best = round(1e3 * min(ts), 3)
        out[str(T)] = {"ms": round(ms, 3), "tokens_per_s": round(T / ms * 1e3, 1), "min_ms": best}
    return out


def agreement(model, prompt: list[int]) -> dict:
    """Fast path vs the HF model on the same weights: prompt logits (eager, every position)."""
    from workbench.runtime.fastpath import FastDecoder

    ids = torch.tensor(prompt, device="cuda")
    with torch.no_grad():
        ref = model(ids[None]).logits[0].float()
        fast = FastDecoder(model, max_cache_len=len(prompt) + 1, mode="eager").logits(ids).float()
    return {
        "max_abs_logit_diff": float((ref - fast).abs().max()),
        "max_abs_logit": float(ref.abs().max()),
        "argmax_agree": float((ref.argmax(-1) == fast.argmax(-1)).float().mean()),
    }


def run_mode(model, path: str, mode: str, prompt, n_tokens: int, breakdown: bool) -> dict:
    """Decode timing (and the step breakdown) of one path / mode; errors are recorded, not raised."""
    from workbench.runtime.decode import make_decoder
    from workbench.runtime.profile import step_breakdown

    try:
        dec = make_decoder(model, max_cache_len=len(prompt) + n_tokens + 8, mode=mode, path=path)
        r = time_decoder(dec, prompt, n_tokens)
        if breakdown:
            r["breakdown"] = step_breakdown(dec, prompt)
        del dec
    except Exception as exc:  # one failing mode must not lose the others' numbers
        r = {"error": f"{type(exc).__name__}: {exc}"[:800]}
    torch.cuda.empty_cache()
    return r


def quantized_model(cfg: dict, plan):
    """(model, ApplyReport or None): the random-weight model with `plan` applied (RTN on the GPU)."""
    from workbench.plan.plan import Plan
    from workbench.runtime.apply import apply_plan

    model = build_model(cfg)
    return model, (apply_plan(model, Plan.from_json(plan)) if plan is not None else None)


def _guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as exc:  # one failing measurement must not lose the others
        return {"error": f"{type(exc).__name__}: {exc}"[:800]}


def prefill_both(model, name: str, a, vocab: int) -> dict:
    """Prefill times on the fast path (and on the HF path for the variants in a.hf_prefill)."""
    from workbench.runtime.decode import StaticDecoder
    from workbench.runtime.fastpath import FastDecoder

    L = max(a.prefill) + 1
    out = {"prefill_fast": _guarded(prefill_times, FastDecoder(model, L, "eager"), a.prefill, vocab)}
    torch.cuda.empty_cache()
    if name in a.hf_prefill:
        out["prefill_hf"] = _guarded(prefill_times, StaticDecoder(model, L, "eager"), a.prefill, vocab)
    torch.cuda.empty_cache()
    return out


def bench_variant(name: str, cfg: dict, plan, a, prompt, bandwidth: float, t_start: float) -> dict:
    """Every run of a.runs but hf:compile (the last phase), agreement and prefill of one variant."""
    from workbench.runtime.memory import model_memory

    model, report = quantized_model(cfg, plan)
    bpt = bytes_per_token(model, len(prompt) + a.tokens // 2)
    res = {
        "variant": name,
        "memory_bytes": model_memory(model).total_bytes,
        "bytes_per_token": bpt,
        "roofline_tokens_per_s": bandwidth / bpt,
        "linear_roofline_ms": 1e3 * linear_bytes(model) / bandwidth,
        "unfused": report.unfused if report else [],
        "runs": {},
    }
    res["agreement"] = _guarded(agreement, model, prompt)
    if a.prefill:  # before the decode runs: torch.compile's background workers would share the CPU
        res.update(prefill_both(model, name, a, cfg["vocab_size"]))
        print(f"  {name} prefill: {res['prefill_fast']}", file=sys.stderr, flush=True)
    for key in a.runs:
        if key == "hf:compile":
            continue
        if time.perf_counter() - t_start > a.budget_s:
            res["runs"][key] = {"error": "skipped: time budget"}
            continue
        path, mode = key.split(":")
        res["runs"][key] = run_mode(model, path, mode, prompt, a.tokens, breakdown=True)
        print(f"  {name} {key}: {short(res['runs'][key])}", file=sys.stderr, flush=True)
    del model
    torch.cuda.empty_cache()
    return res


def hf_compile_phase(results: dict, cfg: dict, plans: dict, a, prompt, t_start: float) -> None:
    """hf:compile (the slow-to-compile reference) for a.hf_compile variants, while the budget lasts."""
    for v in results["variants"]:
        if v["variant"] not in a.hf_compile or "hf:compile" not in a.runs:
            continue
        if time.perf_counter() - t_start > a.budget_s:
            v["runs"]["hf:compile"] = {"error": "skipped: time budget"}
            continue
        model, _ = quantized_model(cfg, plans[v["variant"]])
        v["runs"]["hf:compile"] = run_mode(model, "hf", "compile", prompt, a.tokens, breakdown=True)
        print(f"  {v['variant']} hf:compile: {short(v['runs']['hf:compile'])}", file=sys.stderr, flush=True)
        del model
        torch.cuda.empty_cache()


def short(r: dict) -> str:
    if "error" in r:
        return r["error"][:200]
    b = r.get("breakdown", {})
    return f"{r['tokens_per_s']:.1f} tok/s, setup {r['setup_s']} s, breakdown {b.get('ms')}"


RUNS = "fast:graph,fast:compile,hf:graph,hf:compile"


def run(json: bool = False, quick: bool = False) -> dict:
    """`workbench bench e2e [--json] [--quick]`: the default benchmark (quick: 4 blocks)."""
    return run_args(parse_args(["--json"] * json + ["--layers", "4"] * quick))


def run_args(a) -> dict:
    """Benchmark the variants and print the tables; results also written to `a.out` as JSON."""
    t_start = time.perf_counter()
    cfg = dict(LLAMA3_8B, num_hidden_layers=a.layers) if a.layers else dict(LLAMA3_8B)
    plans = {
        "bf16": None,
        "int4_g128": {"format": "workbench.plan", "version": 1, "default": "int4_g128"},
        "int8_ch": {"format": "workbench.plan", "version": 1, "default": "int8_ch"},
        "mixed": mixed_plan(cfg["num_hidden_layers"]),
    }
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg["vocab_size"], (32,), generator=g).tolist()
    bw = copy_bandwidth()
    import transformers

    results = {
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "copy_bandwidth_TBps": bw / 1e12,
        "config": cfg,
        "n_tokens": a.tokens,
        "prompt_tokens": len(prompt),
        "variants": [],
    }
    for v in a.variants:
        results["variants"].append(bench_variant(v, cfg, plans[v], a, prompt, bw, t_start))
        save(results, a.out, t_start)
    hf_compile_phase(results, cfg, plans, a, prompt, t_start)
    save(results, a.out, t_start)
    if a.json:
        print(jsonlib.dumps(results))
    else:
        print_tables(results)
    return results


def save(results: dict, out: str | None, t_start: float) -> None:
    results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    if out:
        with open(out, "w") as fh:
            jsonlib.dump(results, fh, indent=2)


def print_tables(results: dict) -> None:
    """Speed table (x bf16 in the same path and mode), step breakdown, prefill."""
    print(
        f"\n{results['device']}  {results['date']}  copy bandwidth {results['copy_bandwidth_TBps']:.2f} TB/s"
    )
    base = {k: r["tokens_per_s"] for v in results["variants"] if v["variant"] == "bf16"
            for k, r in v["runs"].items() if "tokens_per_s" in r}  # fmt: skip
    print(f"{'variant':<10} {'run':<13} {'MB/tok':>7} {'tok/s':>8} {'ms/tok':>7} {'%roof':>6} {'x bf16':>7}")
    for v in results["variants"]:
        for k, r in v["runs"].items():
            if "tokens_per_s" not in r:
                print(f"{v['variant']:<10} {k:<13} {r.get('error', '')[:90]}")
                continue
            tps = r["tokens_per_s"]
            print(
                f"{v['variant']:<10} {k:<13} {v['bytes_per_token'] / 1e6:>7.0f} {tps:>8.1f} "
                f"{1e3 / tps:>7.2f} "
                f"{100 * tps / v['roofline_tokens_per_s']:>5.0f}% {tps / base.get(k, float('nan')):>6.2f}x"
            )
    cats = ("linear", "attention", "norm_rotary", "elementwise_copy", "idle")
    print(f"\n{'variant':<10} {'run':<13} {'step ms':>7} " + " ".join(f"{c[:11]:>11}" for c in cats)
          + f" {'kern/step':>9} {'lin roof':>8}")  # fmt: skip
    for v in results["variants"]:
        for k, r in v["runs"].items():
            b = r.get("breakdown")
            if b:
                cells = " ".join(f"{b['ms'][c]:>11.3f}" for c in cats)
                print(
                    f"{v['variant']:<10} {k:<13} {b['step_ms']:>7.3f} {cells} "
                    f"{b['kernels_per_step']:>9.0f} {v['linear_roofline_ms']:>8.3f}"
                )
    for v in results["variants"]:
        for key in ("prefill_fast", "prefill_hf"):
            if key in v and "error" not in v[key]:
                cells = ", ".join(
                    f"{T}: {p['ms']:.1f} ms ({p['tokens_per_s']:.0f} tok/s)" for T, p in v[key].items()
                )
                print(f"{v['variant']:<10} {key:<13} {cells}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=0, help="blocks (default: 32, the Llama-3-8B shape)")
    p.add_argument("--variants", default="bf16,int4_g128,int8_ch,mixed")
    p.add_argument("--runs", default=RUNS, help="path:mode pairs, path fast|hf, mode eager|graph|compile")
    p.add_argument("--hf-compile", default="bf16,int4_g128", help="variants that also run hf:compile")
    p.add_argument("--prefill", default="16,128,512,2048", help="prompt lengths for prefill ('' = none)")
    p.add_argument("--hf-prefill", default="bf16", help="variants whose HF prefill is timed too")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining decode runs after this")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="JSON output path")
    a = p.parse_args(argv)
    a.variants = a.variants.split(",")
    a.runs = a.runs.split(",")
    a.hf_compile = a.hf_compile.split(",")
    a.hf_prefill = a.hf_prefill.split(",")
    a.prefill = [int(t) for t in a.prefill.split(",") if t]
    return a


def main() -> None:
    run_args(parse_args())


if __name__ == "__main__":
    main()
