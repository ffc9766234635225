"""Whole decode step with a bf16 / int8 / int4 KV cache on the Llama-3-8B shape, in CUDA graphs (issue 17).

    python benchmarks/bench_kv_step.py --out bench_kv_step_h200.json            # one H200 (~1.5 min)
    python benchmarks/bench_kv_step.py --small --out /tmp/kv_step_cpu.json      # CPU check, interpreter

1. Whole step: the fast decoder (`workbench.runtime.fastpath.FastDecoder`, mode "graph": embedding ->
   32 blocks -> lm_head -> argmax in one CUDA graph) on the 8B shape with random bf16 weights (and uniform
   int4_g128 weights with --weights bf16,int4_g128), batch 1, the cache filled to 4,096 / 32,768 tokens
   (random K/V written through the store, `StaticKVSide.fill`), then `--steps` graph replays timed with
   CUDA events: tokens/s at that context. Caches: bf16 (the split-K bf16 kernel), int8 = int8_ch_r32 keys /
   int8_tok_r32 values, int4 = int4_ch_r32 / int4_tok_r32 (kernels/attn_kvq.py, `attn_kvq_static`).
   Bytes: `predicted` = KVSpec.cache_bytes of the filled context (all layers), `allocated` = what the
   decoder's buffers hold (`FastDecoder.cache_bytes`, capacity = context + 64).
2. Per-layer attention inside a CUDA graph (one layer, 8B head shape, 32k and 4k tokens): bf16 split-K
   kernel vs the quantized kernels (`impl` "dequant" and "planes") over `SWEEP` (BLOCK_N, num_warps,
   num_stages, n_splits; `--kvregs`: `KVREGS`, the decoder's launch against the register cuts), `--reps`
   replays of a graph of 20 calls, each with its max abs difference to the dequantizing kernel at 64 / 4
   (tf32x3); and the decoder's launch with one-pass tf32 dots (`precision="tf32"`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SPECS = {"bf16": None, "int8": ("int8_ch_r32", "int8_tok_r32"), "int4": ("int4_ch_r32", "int4_tok_r32")}
# per-layer sweep: `attn_kvq_static` keyword arguments (num_stages None: Triton's; n_splits None: from the
# SM count)
SWEEP = [
    {"impl": "dequant", "block_n": bn, "num_warps": nw, "num_stages": None, "n_splits": None,
     "precision": "tf32x3"}
    for bn, nw in [(32, 4), (64, 4)]
] + [
    {"impl": "planes", "block_n": bn, "num_warps": nw, "num_stages": st, "n_splits": sp, "precision": prec}
    for prec in ("tf32x3", "tf32")
    for bn, nw, st in [(16, 4, None), (32, 4, None), (32, 4, 1), (64, 4, 1)]
    for sp in (None, 16, 33)
]  # fmt: skip
# --kvregs: the decoder's launch (planes, BLOCK_N 64, 4 warps, stages 1, 33 splits) against the register cuts
# of branch kvregs (benchmarks/kvq_resources.py has their offline sm_90 registers / spills): the tail loop in
# blocks of 16, key scale rows selected, int8 rows as two planes of 64 channels, fp16 dot operands, and, where
# the registers allow 3 programs per SM (<= 168), 50 splits (3 per SM over 8 kv heads on 132 SMs) with and
# without maxnreg 168.
_DEC = {"impl": "planes", "block_n": 64, "num_warps": 4, "num_stages": 1, "n_splits": 33}
_CUT = {"tail_n": 16, "int8_chunk": 64, "select_rows": True}
KVREGS = [
    _DEC | {"precision": "tf32"},  # the decoder today (bf16 models)
    _DEC | {"precision": "tf32", "tail_n": 16},
    _DEC | {"precision": "tf32", "tail_n": 16, "select_rows": True},
    _DEC | {"precision": "tf32"} | _CUT,
    _DEC | {"precision": "tf32", "n_splits": 50} | _CUT,
    _DEC | {"precision": "tf32", "n_splits": 50, "maxnreg": 168} | _CUT,  # offline: 168 regs, no spills
    _DEC | {"precision": "fp16"},
    _DEC | {"precision": "fp16"} | _CUT,
    _DEC | {"precision": "fp16", "n_splits": 50} | _CUT,
    _DEC | {"precision": "fp16", "n_splits": 50, "maxnreg": 168} | _CUT,
    _DEC | {"precision": "fp16", "n_splits": 66, "maxnreg": 128} | _CUT,
    _DEC | {"precision": "fp16", "block_n": 32, "n_splits": 66} | _CUT,
    _DEC | {"precision": "tf32x3"},  # the decoder today (fp32 models)
    _DEC | {"precision": "tf32x3"} | _CUT,
]


def _kv(n_blocks: int, cache: str) -> dict:
    """{attention module: KVLayerSpec} of every block (what `Plan(k=.., v=..).resolve(model).kv` gives)."""
    from workbench.plan.kv import KVLayerSpec
    from workbench.quant.kvcache import KVSpec

    if SPECS[cache] is None:
        return {}
    k, v = (KVSpec.parse(s) for s in SPECS[cache])
    return {f"model.layers.{i}.self_attn": KVLayerSpec(k, v) for i in range(n_blocks)}


def _fill(dec, ctx: int, seed: int = 0) -> None:
    """Write random K/V for positions 0 .. ctx-1 into every block's cache; the next token is at ctx."""
    g = torch.Generator(device=dec.device).manual_seed(seed)
    s = dec.fm.shape
    for i, c in enumerate(dec.kvq):
        k, v = (torch.randn(s.n_kv, ctx, s.head_dim, generator=g, device=dec.device) for _ in range(2))
        if c is None:
            dec.k[i][:, :ctx].copy_(k)
            dec.v[i][:, :ctx].copy_(v)
        else:
            c.k.fill(k)
            c.v.fill(v)
    dec.pos.fill_(ctx)
    dec.step_idx.zero_()


def _time(fn, steps: int) -> float:
    """Seconds per call of fn() (CUDA events, one warm call first); wall clock on the CPU."""
    fn()
    if torch.cuda.is_available():
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def whole_step(fm, cache: str, ctx: int, steps: int, mode: str) -> dict:
    from workbench.runtime.fastpath import FastDecoder

    kv = _kv(len(fm.blocks), cache)
    dec = FastDecoder(fm, max_cache_len=ctx + 64, mode=mode, kv=kv)
    dec.prepare()  # capture (warm-up steps write slots 0..3; the fill below rewrites them)
    _fill(dec, ctx)
    run = dec.graph.replay if dec.graph is not None else dec._step
    t = _time(run, steps)
    s = fm.shape
    if kv:
        spec = next(iter(kv.values()))
        per_layer = sum(x.cache_bytes(ctx, s.head_dim, s.n_kv) for x in (spec.k, spec.v))
    else:
        per_layer = 2 * ctx * s.n_kv * s.head_dim * 2
    row = {
        "cache": cache, "specs": SPECS[cache], "context": ctx, "mode": dec.mode,
        "step_ms": t * 1e3, "tokens_per_s": 1.0 / t,
        "predicted_cache_bytes": per_layer * len(fm.blocks), "allocated_cache_bytes": dec.cache_bytes(),
    }  # fmt: skip
    del dec
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _graph_time(fn, reps: int, inner: int = 20) -> float:
    """Seconds per fn() call replayed inside a CUDA graph of `inner` calls (eager timing on the CPU)."""
    if not torch.cuda.is_available():
        return _time(fn, reps)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    return _time(g.replay, reps) / inner


def per_layer(shape: dict, contexts: list[int], dev: str, reps: int, sweep: list[dict]) -> list[dict]:
    """One layer's decode attention at each context, timed inside a CUDA graph (module docstring)."""
    from workbench.kernels.attn_kvq import attn_kvq_static

    from workbench.runtime.attention import decode_attention
    from workbench.runtime.kvstatic import StaticKVSide

    hq, hkv, d = shape["hq"], shape["hkv"], shape["d"]
    rows = []
    for ctx in contexts:
        q = torch.randn(hq, d, device=dev, dtype=torch.bfloat16)
        length = torch.tensor([ctx], device=dev)
        kc, vc = (torch.randn(hkv, ctx + 64, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        t = _graph_time(lambda: decode_attention(q, kc, vc, length, d**-0.5), reps)
        rows.append({"cache": "bf16", "context": ctx, "ms": t * 1e3})
        for cache in ("int8", "int4"):
            cap = -(-(ctx + 64) // 64) * 64  # one capacity for both sides (a multiple of the key group)
            sides = [StaticKVSide(sp, hkv, d, cap, torch.bfloat16, dev) for sp in SPECS[cache]]
            for sd in sides:
                sd.fill(torch.randn(hkv, ctx, d, device=dev))
            ka, va = (sd.kernel_args() for sd in sides)
            ref = attn_kvq_static(q[None], ka, va, length, d**-0.5, block_n=64, num_warps=4, impl="dequant")
            for kw in sweep:

                def fn(kw=kw):
                    return attn_kvq_static(q[None], ka, va, length, d**-0.5, **kw)

                row = {"cache": cache, "context": ctx, **kw}
                try:  # a launch that does not fit (shared memory, registers) is a result, not a crash
                    row["max_abs_diff_vs_dequant_64_4"] = (fn() - ref).abs().max().item()
                    row["ms"] = _graph_time(fn, reps) * 1e3
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
            try:
                rows.append(_one_pass_row(q, ka, va, length, d, cache, ctx, reps))
            except Exception as e:
                rows.append(
                    {
                        "cache": cache,
                        "context": ctx,
                        "precision": "tf32",
                        "error": f"{type(e).__name__}: {e}"[:200],
                    }
                )
    return rows


def _one_pass_row(q, ka, va, length, d: int, cache: str, ctx: int, reps: int) -> dict:
    """The decoder's launch (`fastkv.LAUNCH`, `kernel_splits`) with one-pass tf32 dots (its bf16 setting):
    time, and the max abs difference to the same launch with tf32x3."""
    from workbench.kernels.attn_kvq import attn_kvq_static

    from workbench.runtime.fastkv import LAUNCH, kernel_splits

    splits = kernel_splits(q, ka["codes"].shape[1])

    def fn(prec="tf32"):
        return attn_kvq_static(q[None], ka, va, length, d**-0.5, n_splits=splits, precision=prec, **LAUNCH)

    err = (fn() - fn("tf32x3")).abs().max().item()
    t = _graph_time(fn, reps)
    row = {"cache": cache, "context": ctx, **LAUNCH, "n_splits": splits, "precision": "tf32", "decoder": True}
    return row | {"ms": t * 1e3, "max_abs_diff_vs_tf32x3": err}


def _model(cfg: dict, weights: str, dev: str):
    from bench_e2e import build_model

    model = build_model(cfg, device=dev)
    if weights != "bf16":
        from workbench.plan.plan import Plan
        from workbench.runtime.apply import apply_plan

        apply_plan(model, Plan(default=weights).resolve(model))
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="CPU check: tiny shape, Triton interpreter, eager")
    p.add_argument("--weights", default="bf16", help="comma list: bf16, int4_g128")
    p.add_argument("--contexts", default="4096,32768")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--skip-layer", action="store_true")
    p.add_argument(
        "--no-sweep", action="store_true", help="per layer: dequant 64 / 4 and the decoder launch only"
    )
    p.add_argument("--kvregs", action="store_true", help="per layer: KVREGS (the register cuts) only")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not a.small:
        raise SystemExit("bench_kv_step: no CUDA device (use --small for the CPU check)")
    if a.small:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from workbench.presets import LLAMA3_8B
    from workbench.runtime.fastpath import FastModel

    dev = "cuda" if cuda else "cpu"
    cfg = dict(LLAMA3_8B, max_position_embeddings=40960)
    if a.small:
        cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256)  # fmt: skip
    contexts = [100, 200] if a.small else [int(c) for c in a.contexts.split(",")]
    t0 = time.perf_counter()
    res = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "whole_step": [], "per_layer": [],
    }  # fmt: skip
    out = Path(a.out)
    d = 16 if a.small else 128
    shape = {"hq": cfg["num_attention_heads"], "hkv": cfg["num_key_value_heads"], "d": d}
    if not a.skip_layer:
        sweep = KVREGS if a.kvregs else SWEEP[1:2] if a.no_sweep else SWEEP
        res["per_layer"] = per_layer(shape, contexts, dev, 2 if a.small else a.reps, sweep)
        out.write_text(json.dumps(res, indent=1))
    for weights in filter(None, a.weights.split(",")):  # --weights "": the per-layer part only
        model = _model(cfg, weights, dev)
        fm = FastModel(model)
        for ctx in contexts:
            for cache in SPECS:
                mode = "eager" if a.small else "graph"
                row = dict(weights=weights, **whole_step(fm, cache, ctx, 2 if a.small else a.steps, mode))
                res["whole_step"].append(row)
                print(json.dumps(row), flush=True)
                res["seconds"] = time.perf_counter() - t0
                out.write_text(json.dumps(res, indent=1))
        del fm, model
        if cuda:
            torch.cuda.empty_cache()
    print(f"bench_kv_step: wrote {out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
