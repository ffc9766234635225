"""KV-cache quantization quality on a real model (issue 17), simulated on the CPU or the GPU.

    python benchmarks/kv_quality.py [--model default|PATH.gguf] [--tokens 32768] [--seq-len 2048]
        --out kv.json [--device cuda|cpu] [--budget-s S] [--outlier-top 6]
    python benchmarks/kv_quality.py --report kv.json          # the markdown tables of a finished run
    python benchmarks/kv_quality.py --outliers 6              # blocks with the largest K / V outlier channels

Device: `--device` (default: cuda when available). The model, the reference and the simulated cache run there
in float32 with fp32 matmuls ("highest" precision, no TF32): the same arithmetic as on the CPU, where the K8V8
rows measure KLs of ~1e-5 nats that bf16 noise would swamp. `--budget-s`: no new row starts after that many
seconds. After the rows, a run also stores the `--outlier-top` blocks with the largest key and value outlier
channels (16 x 512 tokens of `wiki`) under "outliers" in --out (0: skip).

Every row quantizes only the KV cache (the weights stay as loaded, fp32): a ResolvedPlan with no layers
and the plan's `kv`, evaluated by `workbench.measure.evaluate.evaluate` (teacher-forced, the cache simulated
as the
runtime stores it, workbench/measure/kvsim.py). KL(P_ref || P_q) and perplexity on WikiText-2 test windows of
--seq-len. Results are written to --out after every row; a rerun skips the rows already there (resumes).
Rows: KIVI layout (keys per channel in groups of 32 tokens, values per token) at 8, 4 and 2 bits with
R = 32 and R = 0; K4V4 with Hadamard keys; per-token K4 keys; fp8 K/V; pre- vs post-RoPE keys at K4 alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from workbench.measure.evaluate import evaluate
from workbench.model.loading import load_model
from workbench.plan.plan import Plan, ResolvedPlan

# row name -> (key spec, value spec); None keeps that side bf16
CONFIGS = {
    "K8V8 R32": ("int8_ch_r32", "int8_tok_r32"),
    "K8V8 R0": ("int8_ch", "int8_tok"),
    "K4V4 R32": ("int4_ch_r32", "int4_tok_r32"),
    "K4V4 R0": ("int4_ch", "int4_tok"),
    "K2V2 R32": ("int2_ch_r32", "int2_tok_r32"),
    "K2V2 R0": ("int2_ch", "int2_tok"),
    "K4V4 R32, Hadamard keys (per channel)": ("int4_ch_r32_had", "int4_tok_r32"),
    "K4V4 R0, Hadamard keys (per token)": ("int4_tok_had", "int4_tok"),
    "K4V4 R0, per-token keys": ("int4_tok", "int4_tok"),
    "K8V8 fp8_e4m3 per token": ("fp8_e4m3_tok", "fp8_e4m3_tok"),
    "K4 post-RoPE (per channel, R0), V bf16": ("int4_ch", None),
    "K4 pre-RoPE (per channel, R0), V bf16": ("int4_ch_pre", None),
}


def pick_device(name: str | None) -> str:
    """`--device`: the name given, else cuda when available, else cpu."""
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def run(args) -> None:
    t_start = time.perf_counter()
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else {}
    device = pick_device(args.device)
    torch.set_float32_matmul_precision("highest")  # fp32 matmuls stay fp32 on the GPU (module doc)
    loaded = load_model(args.model, device=device)
    dev_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(
        f"loaded {args.model} on {device} ({dev_name}) in {time.perf_counter() - t_start:.1f} s", flush=True
    )
    cfg = loaded.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    names = [n for n in CONFIGS if not args.only or any(s in n for s in args.only.split(","))]
    for name in names:
        if name in done:
            continue
        if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            print(f"{name}: skipped (budget)", flush=True)
            continue
        k, v = CONFIGS[name]
        kv = Plan(k=k, v=v).resolve(loaded.model).kv
        t0 = time.perf_counter()
        r = evaluate(
            loaded, ResolvedPlan({}, [], kv=kv), seq_len=args.seq_len, max_tokens=args.tokens, progress=False
        )
        spec = next(iter(kv.values()))
        n_blocks, n_kv = len(kv), cfg.num_key_value_heads
        per_tok = sum(
            (s.cache_bytes(args.seq_len, head_dim, n_kv) if s else args.seq_len * head_dim * 2 * n_kv)
            for s in (spec.k, spec.v)
        )
        done[name] = {
            "k": k,
            "v": v,
            "kl": r.kl,
            "ppl": r.ppl,
            "ref_ppl": r.ref_ppl,
            "top1": r.top1,
            "n_tokens": r.n_tokens,
            "seq_len": r.seq_len,
            "bytes_per_token_at_context": n_blocks * per_tok / args.seq_len,
            "bf16_bytes_per_token": n_blocks * 2 * head_dim * 2 * n_kv,
            "seconds": time.perf_counter() - t0,
            "device": dev_name,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        out.write_text(json.dumps(done, indent=1))
        took, elapsed = time.perf_counter() - t0, time.perf_counter() - t_start
        print(
            f"{name}: KL {r.kl:.5f} PPL {r.ppl:.3f} (ref {r.ref_ppl:.3f}) {took:.1f} s "
            f"({elapsed:.0f} s in all)",
            flush=True,
        )
    if args.outlier_top and "outliers" not in done:
        done["outliers"] = outlier_rows(loaded, args.outlier_top)
        out.write_text(json.dumps(done, indent=1))
        print(f"outliers stored ({time.perf_counter() - t_start:.0f} s in all)", flush=True)


def report(path: str) -> None:
    data = json.loads(Path(path).read_text())
    rows = {name: r for name, r in data.items() if "kl" in r}
    print(f"device: {next(iter(rows.values())).get('device', 'cpu')}\n")
    print("| cache (K / V) | key spec | value spec | bytes/token at context | KL | PPL | top-1 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | `{r['k'] or 'bf16'}` | `{r['v'] or 'bf16'}` | {r['bytes_per_token_at_context']:.0f} "
            f"(bf16 {r['bf16_bytes_per_token']}) | {r['kl']:.5f} | {r['ppl']:.3f} | {100 * r['top1']:.2f}% |"
        )
    any_row = next(iter(rows.values()))
    print(
        f"\nreference PPL {any_row['ref_ppl']:.3f}; {any_row['n_tokens']} tokens, "
        f"windows of {any_row['seq_len']}"
    )
    for side, top in data.get("outliers", {}).items():
        print(f"\n{side}: blocks with the largest outlier channel (16 x 512 tokens of `wiki`)\n")
        print("| block | head | channel | absmax / median channel absmax of the head | absmax |")
        print("|---|---|---|---|---|")
        for r in top:
            print(f"| {r['block']} | {r['head']} | {r['channel']} | {r['ratio']:.2f} | {r['absmax']:.2f} |")


def outlier_rows(loaded, top: int) -> dict[str, list[dict]]:
    """{side: the `top` blocks whose keys (pre / post RoPE) or values have the largest outlier channels}
    (16 x 512 tokens of `wiki`), as JSON-ready rows."""
    from workbench.stats.kv import SIDES, kv_statistics

    stats = kv_statistics(loaded, "wiki", 16, 512, 0)
    return {side: stats.outliers(side, top) for side in SIDES}


def outliers(model: str, top: int, device: str | None) -> None:
    """Print the blocks whose keys (and values) have the largest outlier channels (`outlier_rows`)."""
    for side, rows in outlier_rows(load_model(model, device=pick_device(device)), top).items():
        print(f"\n{side}: block, head, channel, absmax / median channel absmax of the head, absmax")
        for r in rows:
            print(f"| {r['block']} | {r['head']} | {r['channel']} | {r['ratio']:.2f} | {r['absmax']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--only", help="comma-separated substrings of row names to run")
    p.add_argument("--out", default="kv_quality.json")
    p.add_argument("--report", help="print the markdown table of this JSON and exit")
    p.add_argument("--outliers", type=int, metavar="N", help="print the N blocks with the largest outliers")
    p.add_argument(
        "--outlier-top", type=int, default=6, help="blocks per side stored in --out after the rows"
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    args = p.parse_args()
    if args.outliers:
        outliers(args.model, args.outliers, args.device)
    elif args.report:
        report(args.report)
    else:
        run(args)


if __name__ == "__main__":
    main()
