"""KV-cache runtime benchmark (issue 17): decode attention over bf16, int8, int4 caches; the kernel's KL.

    python benchmarks/bench_kv.py --out bench_kv_h200.json          # on one H200 (< 4 min)
    python benchmarks/bench_kv.py --small --out /tmp/kv_cpu.json    # CPU check: small shapes, interpreter

1. Attention step on the Llama-3-8B shape (32 layers, 32 query heads, 8 kv heads, head dim 128, batch 1) at
   4k and 32k tokens of context: the time of one decode token's attention in one layer, x 32 layers (the
   attention share of a decode step; the weights' GEMVs are not part of it), as tokens/s, for
       bf16   torch scaled_dot_product_attention over the bf16 cache (GQA expanded)
       int8   kernels/attn_kvq.py over int8_ch_r32 keys, int8_tok_r32 values (packed store)
       int4   kernels/attn_kvq.py over int4_ch_r32 keys, int4_tok_r32 values
   and the exact cache bytes of one sequence (all 32 layers, `QuantKVSide.nbytes`).
   Then the int8 / int4 kernel over a grid of (block_n, n_splits) launch configs (`kernel_configs`).
2. KL of the GPU kernel against the CPU simulation on stories260K: the model fed token by token through the
   packed store and the Triton kernel on the GPU (runtime/kvcache.kv_decode_logits) vs the teacher-forced
   simulation (kvsim.kv_quantized) on the CPU, same tokens, K4V4 (int4_ch_r32 / int4_tok_r32) and K8V8.

Everything goes to --out as JSON; any failure raises (non-zero exit), nothing is skipped silently.
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

SHAPE_8B = {"layers": 32, "hq": 32, "hkv": 8, "d": 128}
SPECS = {"int8": ("int8_ch_r32", "int8_tok_r32"), "int4": ("int4_ch_r32", "int4_tok_r32")}


def _timeit(fn, iters: int) -> float:
    """Median seconds of fn() over `iters` runs (CUDA-synchronized), after 3 warm-up runs."""
    cuda = torch.cuda.is_available()
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def attention_rows(shape: dict, contexts: list[int], dev: str, iters: int) -> list[dict]:
    from workbench.kernels.attn_kvq import attn_kvq

    from workbench.runtime.kvcache import QuantKVSide, kernel_args

    L, hq, hkv, d = shape["layers"], shape["hq"], shape["hkv"], shape["d"]
    rows = []
    for n in contexts:
        torch.manual_seed(0)
        q = torch.randn(1, hq, d, device=dev, dtype=torch.bfloat16)
        K = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
        V = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
        Ke, Ve = K.repeat_interleave(hq // hkv, 1), V.repeat_interleave(hq // hkv, 1)

        def bf16():
            return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], Ke, Ve)

        t = _timeit(bf16, iters)
        rows.append(_row("bf16", n, t, L, 2 * L * n * hkv * d * 2))
        ref = bf16()[:, :, 0].float()
        cap = -(-n // 64) * 64 + 64
        for name, (ks, vs) in SPECS.items():
            k, v = QuantKVSide(ks, 1, hkv, d, cap, dev), QuantKVSide(vs, 1, hkv, d, cap, dev)
            k.append(K)
            v.append(V)
            ka, va = kernel_args(k), kernel_args(v)
            out = attn_kvq(q, ka, va, n, d**-0.5)
            if not torch.isfinite(out).all():
                raise RuntimeError(f"attn_kvq {name} at {n} tokens returned non-finite values")
            err = float((out - ref).abs().max())
            t = _timeit(lambda ka=ka, va=va: attn_kvq(q, ka, va, n, d**-0.5), iters)
            rows.append(_row(name, n, t, L, L * (k.nbytes() + v.nbytes()), max_abs_vs_bf16=err))
        print(json.dumps(rows[-3:]), flush=True)
    return rows


def config_sweep(shape: dict, contexts: list[int], dev: str, iters: int, small: bool) -> list[dict]:
    """ms per layer of the int4 / int8 kernel per (block_n, n_splits), checked against the default config."""
    from workbench.kernels.attn_kvq import attn_kvq

    from workbench.runtime.kvcache import QuantKVSide, kernel_args

    hq, hkv, d = shape["hq"], shape["hkv"], shape["d"]
    grid = (
        [(16, None), (16, 3)] if small else [(b, s) for b in (32, 64, 128) for s in (None, 16, 32, 64, 128)]
    )
    rows = []
    for n in contexts:
        torch.manual_seed(0)
        q = torch.randn(1, hq, d, device=dev, dtype=torch.bfloat16)
        K = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
        V = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
        cap = -(-n // 64) * 64 + 64
        for name, (ks, vs) in SPECS.items():
            k, v = QuantKVSide(ks, 1, hkv, d, cap, dev), QuantKVSide(vs, 1, hkv, d, cap, dev)
            k.append(K)
            v.append(V)
            ka, va = kernel_args(k), kernel_args(v)
            want = attn_kvq(q, ka, va, n, d**-0.5)
            for block_n, splits in grid:
                out = attn_kvq(q, ka, va, n, d**-0.5, block_n=block_n, n_splits=splits)
                err = float((out - want).abs().max())
                if not err < 1e-3:
                    raise RuntimeError(f"attn_kvq {name} block_n={block_n} n_splits={splits}: off by {err}")
                t = _timeit(
                    lambda b=block_n, s=splits: attn_kvq(q, ka, va, n, d**-0.5, block_n=b, n_splits=s), iters
                )
                row = {
                    "cache": name,
                    "context": n,
                    "block_n": block_n,
                    "n_splits": splits,
                    "ms_per_layer": 1e3 * t,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _row(cache: str, n: int, t_layer: float, L: int, nbytes: int, **extra) -> dict:
    return {
        "cache": cache,
        "context": n,
        "attention_ms_per_layer": 1e3 * t_layer,
        "attention_ms_per_token": 1e3 * t_layer * L,
        "attention_tokens_per_s": 1.0 / (t_layer * L),
        "cache_bytes": nbytes,
        "cache_gb": nbytes / 1e9,
        **extra,
    }


def kernel_vs_simulation(dev: str, n_tokens: int) -> list[dict]:
    """KL(P_sim || P_kernel) per token on stories260K: GPU decode through the kernel vs CPU simulation."""
    from workbench.measure.evaluate import token_kl
    from workbench.measure.kvsim import kv_quantized
    from workbench.model.data import eval_windows
    from workbench.model.loading import load_model
    from workbench.plan.plan import Plan
    from workbench.runtime.kvcache import kv_decode_logits

    cpu = load_model("stories260K", progress=False)
    ids = eval_windows(cpu.tokenizer, "wikitext2", n_tokens, n_tokens, max_context=None)[:1]
    out = []
    for name, (ks, vs) in SPECS.items():
        kv = Plan(k=ks, v=vs).resolve(cpu.model).kv
        with torch.no_grad(), kv_quantized(cpu.model, kv):
            sim = torch.log_softmax(cpu.model(input_ids=ids, use_cache=False).logits.float(), -1)
        gpu_model = load_model("stories260K", progress=False, device=dev).model
        dec = kv_decode_logits(gpu_model, ids.to(dev), kv, triton=True)
        lp = torch.log_softmax(dec.float().cpu(), -1)
        kl = token_kl(sim, lp)
        row = {"cache": name, "k": ks, "v": vs, "tokens": int(ids.shape[1]), "kl_mean": float(kl.mean())}
        row["kl_max"] = float(kl.max())
        row["top1_agree"] = float((sim.argmax(-1) == lp.argmax(-1)).float().mean())
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="CPU check: tiny shape, Triton interpreter")
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        raise SystemExit("bench_kv: no CUDA device (use --small for the CPU check)")
    if args.small:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dev = "cuda" if cuda else "cpu"
    t0 = time.perf_counter()
    shape = {"layers": 2, "hq": 4, "hkv": 2, "d": 16} if args.small else SHAPE_8B
    contexts = [100, 300] if args.small else [4096, 32768]
    res = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "shape": shape,
        "attention": attention_rows(shape, contexts, dev, 3 if args.small else args.iters),
    }
    res["kernel_configs"] = config_sweep(
        shape, contexts[:1] if args.small else contexts, dev, 1 if args.small else 20, args.small
    )
    res["kernel_vs_simulation"] = kernel_vs_simulation(dev, 24 if args.small else 256)
    res["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(res, indent=1))
    bad = [r for r in res["kernel_vs_simulation"] if not r["kl_mean"] < 1e-3]
    if bad:
        print(f"bench_kv: kernel disagrees with the simulation: {bad}", file=sys.stderr)
        return 1
    print(f"bench_kv: wrote {args.out} in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
