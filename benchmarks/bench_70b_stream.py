"""A Llama-3-70B-shaped model through the streaming loop on one GPU: inspect, proxy scan, GPTQ (issue 18).

    python benchmarks/bench_70b_stream.py --blocks 8 --out 70b_8.json       # on the H200: 8 of 80 blocks,
                                                                            # every phase, ~1.5 min (estimate)
    python benchmarks/bench_70b_stream.py --phases inspect --out 70b.json   # one phase at 80 blocks: each is
                                                                            # estimated at 4-9 min (RESULTS)
    python benchmarks/bench_70b_stream.py --phases scan --blocks 8 --out x.json   # one phase, 8 blocks
    python benchmarks/bench_70b_stream.py --tiny --out tiny.json            # 2 blocks, hidden 256, CPU
    python benchmarks/bench_70b_stream.py --estimate --out est.json         # CPU timing of one 70B block
                                                                            # + H200 estimate (no GPU)
    python benchmarks/bench_70b_stream.py --estimate-model --out est.json   # the H200 estimate of the
                                                                            # current GPU paths (no timing)
    bash benchmarks/gpu_issue18.sh                                          # the one device command

The weights come from `workbench.streaming.SyntheticSource` (hidden 8192, FFN 28672, 80 blocks, 64 heads /
8 KV heads, vocab 128256; bf16 on CUDA), generated per block on the device: no 140 GB checkpoint. Calibration
ids are seeded uniform random tokens (the model has no tokenizer). Phases, each optional (--phases):
    inspect   weight + activation statistics of all 561 linears over --inspect-seqs x --seq-len tokens
              (default 128 x 2048); every Gram is computed on the GPU and dropped (a 70B model's Grams
              are ~650 GB in float64), or not computed (--inspect-grams off)
    scan      proxy sensitivity of the 560 block linears x 6 RTN specs from --calib-seqs x --seq-len tokens
    gptq      int4_g128:gptq of the 560 block linears, Grams from --calib-seqs x --seq-len tokens,
              written shard by shard to --write (default: not written)
Reported per phase: wall seconds, the wall time of every block, a PROJECTION to 80 blocks from the measured
blocks (`project`), peak GPU memory (torch.cuda.max_memory_allocated), peak host RSS, and at the end a
markdown table of all phases (`markdown`). Targets
(issue 18): inspect < 300 s, scan < 120 s, gptq < 480 s, peak GPU < 40 GiB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SPECS = ["int2_g64", "int3_g128", "int4_g128", "int8_ch", "nvfp4", "fp8_e4m3"]  # as bench_sensitivity_gpu
TARGETS_S = {"inspect": 300, "scan": 120, "gptq": 480}
TARGET_GPU_GIB = 40
FULL_BLOCKS = 80  # Llama-3-70B


def _say(msg: str) -> None:
    print(msg, flush=True)


def _source(shape: dict, blocks: int | None):
    from workbench.streaming.source import SyntheticSource

    shape = dict(shape)
    if blocks:
        shape["num_hidden_layers"] = blocks
    return SyntheticSource(
        shape, seed=0, name=f"synthetic-{shape['num_hidden_layers']}b-{shape['hidden_size']}"
    )


def _ids(vocab: int, n: int, L: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def run_phase(phase: str, sm, args, vocab: int) -> dict:
    """One phase on a fresh StreamedModel; returns its report as JSON."""
    from workbench.model.inventory import layer_inventory
    from workbench.streaming.quantize import stream_quantize
    from workbench.streaming.runs import stream_inspect, stream_proxy_scan

    bs = args.batch_size
    if phase == "inspect":
        ids = _ids(vocab, args.inspect_seqs, args.seq_len, 0)
        gram_pass = args.inspect_grams == "drop"
        insp, rep = stream_inspect(sm, ids, gram_pass=gram_pass, batch_size=bs, progress=not args.quiet)
        rep.extra["grams"] = args.inspect_grams
        top = insp.outliers(1)
        rep.extra["most_outlier_input"] = {k: top[0][k] for k in ("label", "max_ratio")} if top else None
    elif phase == "scan":
        ids = _ids(vocab, args.calib_seqs, args.seq_len, 1)
        blocks = [x.name for x in layer_inventory(sm.model) if x.block is not None]  # the 560 of the issue
        table, rep = stream_proxy_scan(
            sm, ids, SPECS, settings={"ids": "uniform"}, layers=blocks, batch_size=bs, progress=not args.quiet
        )
        first = table.layers[0].name
        rep.extra["costs_of_first_layer"] = table.cost[first]
    elif phase == "gptq":
        ids = _ids(vocab, args.calib_seqs, args.seq_len, 2)
        plan = {x.name: "int4_g128:gptq" for x in layer_inventory(sm.model) if x.block is not None}
        out = Path(args.write) if args.write else Path("/nonexistent-not-written")
        _, rep = stream_quantize(
            sm, plan, out, ids, write=bool(args.write), batch_size=bs, progress=not args.quiet
        )
    else:
        raise SystemExit(f"unknown phase {phase}")
    res = rep.to_json()
    gib = (res["peak_gpu_bytes"] or 0) / 2**30
    res.update(peak_gpu_gib=round(gib, 2), peak_host_rss_gib=round(res["peak_host_rss_bytes"] / 2**30, 2))
    target = TARGETS_S[phase]
    res["meets_time_target"] = res["seconds"] < target if sm.n_blocks == FULL_BLOCKS else None
    res["projection"] = project(res["seconds"], res["block_seconds"], FULL_BLOCKS, target)
    after = res["after_seconds"][1:] or res["after_seconds"]
    res["projection"]["per_block_after_s"] = round(sum(after) / len(after), 3) if after else None
    _say(
        f"{phase:8s} {res['seconds']:8.1f} s (target {target} s at 80 blocks)  peak GPU {gib:6.2f} GiB  "
        f"host RSS {res['peak_host_rss_gib']:.2f} GiB  ({res['n_layers']} layers, {sm.n_blocks} blocks)"
    )
    _say(f"         {res['projection']['label']}: ~{res['projection']['seconds']:.0f} s")
    return res


def project(total_s: float, block_s: list[float], n_full: int, target: float) -> dict:
    """PROJECTION of a phase to `n_full` blocks from the measured per-block wall times: the time outside the
    blocks (residents' capture, output head) as measured, plus n_full x the mean of the blocks after the first
    (the first carries the kernels' compilation and the allocator's warm-up; with one block, that one)."""
    steady = block_s[1:] or block_s
    per = sum(steady) / len(steady) if steady else 0.0
    outside = total_s - sum(block_s)
    full = len(block_s) >= n_full
    seconds = total_s if full else outside + n_full * per
    label = (
        f"MEASURED: a {len(block_s)}-block run (wall time, no projection)"
        if full
        else f"PROJECTION to {n_full} blocks from {len(block_s)} measured blocks (not a {n_full}-block run)"
    )
    return {
        "label": label,
        "projected": not full,
        "measured_blocks": len(block_s),
        "per_block_s": round(per, 3),
        "first_block_s": round(block_s[0], 3) if block_s else None,
        "outside_blocks_s": round(outside, 3),
        "seconds": round(seconds, 1),
        "target_s": target,
        "meets_target": seconds < target,
    }


def _whole(pr: dict) -> str:
    """The 80-block column: a projection (marked) or, for a full run, the measured wall time."""
    return (
        f"~{pr['seconds']:.0f} s (projection)"
        if pr.get("projected", True)
        else f"{pr['seconds']:.1f} s (measured)"
    )


def markdown(res: dict) -> str:
    """The results as a markdown table (to paste into benchmarks/RESULTS.md)."""
    rows = [
        f"{res['device']}, {res['date']}, `{res['command']}`",
        "",
        "| phase | blocks measured | wall s | s per block (steady) | of it after the pass (per-layer work)"
        " | s outside blocks | 80 blocks | target | verdict | peak GPU GiB | peak host RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in res["phases"].items():
        pr = p["projection"]
        gpu = f"{p['peak_gpu_gib']:.2f} (< {TARGET_GPU_GIB})" if p["peak_gpu_bytes"] is not None else "-"
        verdict = "meets" if pr["meets_target"] else "MISSES"
        rows.append(
            f"| {name} | {pr['measured_blocks']} | {p['seconds']:.1f} | {pr['per_block_s']:.3f} | "
            f"{pr.get('per_block_after_s') or 0:.3f} | "
            f"{pr['outside_blocks_s']:.1f} | {_whole(pr)} | {pr['target_s']} s | "
            f"{verdict} | {gpu} | {p['peak_host_rss_gib']:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    from workbench.presets import LLAMA3_70B, TINY_LLAMA
    from workbench.streaming.skeleton import StreamedModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="2 blocks, hidden 256, on the CPU (seconds)")
    ap.add_argument("--medium", action="store_true", help="hidden 1024, FFN 4096 (CPU memory-bound checks)")
    ap.add_argument(
        "--estimate", action="store_true", help="time one 70B block on the CPU; estimate the H200"
    )
    ap.add_argument(
        "--estimate-model", action="store_true", help="the H200 estimate of this branch's paths (no timing)"
    )
    ap.add_argument("--phases", default="inspect,scan,gptq", help="comma-separated: inspect, scan, gptq")
    ap.add_argument("--blocks", type=int, default=None, help="decoder blocks (default 80; tiny 2)")
    ap.add_argument("--inspect-seqs", type=int, default=None, help="inspect sequences (default 128; tiny 4)")
    ap.add_argument("--calib-seqs", type=int, default=None, help="scan/GPTQ sequences (default 8; tiny 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    ap.add_argument(
        "--batch-size", type=int, default=None, help="sequences per forward (default ~16k tokens)"
    )
    ap.add_argument("--device", default=None, help="default cuda (tiny: cpu)")
    ap.add_argument(
        "--inspect-grams",
        choices=("drop", "off"),
        default="drop",
        help="inspect: compute Grams and drop them, or skip",
    )
    ap.add_argument("--write", default=None, help="gptq: write the packed model to this folder")
    ap.add_argument("--quiet", action="store_true", help="no per-block progress bars")
    ap.add_argument("--out", required=True, help="JSON results")
    args = ap.parse_args(argv)
    if args.estimate_model:
        res = estimate_now(LLAMA3_70B)
        _say(json.dumps(res, indent=1))
        Path(args.out).write_text(json.dumps(res, indent=1))
        return res
    if args.estimate:
        res = estimate(LLAMA3_70B)
        Path(args.out).write_text(json.dumps(res, indent=1))
        return res
    tiny = args.tiny or args.medium  # small-shape defaults (CPU, few tokens)
    device = torch.device(args.device or ("cpu" if tiny else "cuda"))
    shape = TINY_LLAMA if tiny else LLAMA3_70B
    if args.medium:
        shape = dict(TINY_LLAMA, hidden_size=1024, intermediate_size=4096, num_attention_heads=8)
    args.inspect_seqs = args.inspect_seqs or (4 if tiny else 128)
    args.calib_seqs = args.calib_seqs or (2 if tiny else 8)
    args.seq_len = args.seq_len or (64 if tiny else 2048)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "benchmarks/bench_70b_stream.py", *(argv or sys.argv[1:])]),
        "shape": shape,
        "dtype": str(dtype),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "phases": {},
    }
    for phase in [p.strip() for p in args.phases.split(",") if p.strip()]:
        t0 = time.perf_counter()
        sm = StreamedModel(_source(shape, args.blocks), device, dtype)
        build = time.perf_counter() - t0
        key = phase if phase != "inspect" or args.inspect_grams == "drop" else "inspect_no_grams"
        res["phases"][key] = {
            "build_residents_s": round(build, 2),
            **run_phase(phase, sm, args, shape["vocab_size"]),
        }
        del sm
        if device.type == "cuda":
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(res, indent=1))  # after every phase: a cut run keeps its rows
    res["markdown"] = markdown(res)
    Path(args.out).write_text(json.dumps(res, indent=1))
    _say(res["markdown"])
    return res


# ---------------------------------------------------------------------- the estimate (no GPU)
# H200 rates measured earlier on 8B shapes (anchors; scaled here by FLOPs):
ANCHOR_INSPECT_8B_S = 48.7  # 128 x 2048 tokens, Grams on: issue 18's text (bench_inspect_gpu.py)
ANCHOR_PROXY_8B_S = 18.0  # 225 layers x 6 specs: RESULTS.md issue 13 run 3 (bench_sensitivity_gpu.py)
ANCHOR_PROXY_FP32_TFLOPS = 37.2  # the effective fp32 rate of that run (estimate()'s rates_tflops["proxy"])
ASSUMED_LAUNCH_US = 6.0  # one eager CUDA kernel launch (assumption, typical of PyTorch on H100/H200)
ASSUMED_FP64_TFLOPS = 30.0  # sustained fp64 Cholesky on an H200 (assumption: ~half its 67 TFLOP/s peak)
ASSUMED_TF32_TFLOPS = 200.0  # the streaming proxy's D G D^T in TF32 (assumption: ~40% of the dense peak)
ASSUMED_LAUNCHES_PER_GPTQ_BLOCK = 12  # torch ops around one gptq_block launch (params, slices, the GEMM)
ASSUMED_GPTQ_BLOCK_KERNEL_US = 500.0  # one gptq_block launch: 128 dependent column steps x ~2 us, 2 waves


def estimate_now(shape: dict) -> dict:
    """ESTIMATE (no GPU) of each phase on an H200 with this branch's GPU paths: Grams over the upper block
    triangle, TF32 proxy forms, GPTQ's column loop one launch per 128-column block. The same 8B anchor rates
    as `estimate` (conservative: an 8B run's effective rate, stats included), the same fp64 assumption."""
    from workbench.presets import LLAMA3_8B

    n70 = shape["num_hidden_layers"]
    f8 = phase_flops(LLAMA3_8B, 128 * 2048, 2048)
    rate = LLAMA3_8B["num_hidden_layers"] * (f8["forward"] + f8["grams"]) / ANCHOR_INSPECT_8B_S
    f70, c70 = phase_flops(shape, 128 * 2048, 2048), phase_flops(shape, 8 * 2048, 2048)
    calib = (c70["forward"] + c70["grams_upper"]) / rate
    blocks = c70["gptq_launch_blocks"]
    gptq_loop = blocks * (ASSUMED_LAUNCHES_PER_GPTQ_BLOCK * ASSUMED_LAUNCH_US + ASSUMED_GPTQ_BLOCK_KERNEL_US)
    per_block = {
        "inspect": (f70["forward"] + f70["grams_upper"]) / rate,
        "scan": calib + 7 * c70["proxy_per_spec"] / (ASSUMED_TF32_TFLOPS * 1e12),
        "gptq": calib
        + 2 * c70["gptq_gemm"] / (ANCHOR_PROXY_FP32_TFLOPS * 1e12)
        + c70["gptq_fp64"] / (ASSUMED_FP64_TFLOPS * 1e12)
        + gptq_loop * 1e-6,
    }
    return {
        "label": "ESTIMATE (FLOP model at 8B anchor rates), not measured",
        "per_block_s": {k: round(v, 3) for k, v in per_block.items()},
        "gptq_column_loop_per_block_s": round(gptq_loop * 1e-6, 3),
        "seconds": {k: round(n70 * v, 1) for k, v in per_block.items()},
        "inspect_rate_tflops": round(rate / 1e12, 1),
    }


def linears(shape: dict) -> list[tuple[str, int, int]]:
    """(role, N, K) of the 7 linears of one block."""
    H, F = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * H // shape["num_attention_heads"]
    return [
        ("q", H, H),
        ("k", kv, H),
        ("v", kv, H),
        ("o", H, H),
        ("gate", F, H),
        ("up", F, H),
        ("down", H, F),
    ]


def phase_flops(shape: dict, tokens: int, seq_len: int) -> dict:
    """FLOPs of one block: forward, Grams of the 4 distinct inputs, one proxy spec (2 N K^2 per linear:
    D G, and the same for W G), GPTQ's lazy-batch updates (~N K^2), its fp64 Cholesky work (~1.33 K^3 per
    distinct input: q/k/v and gate/up run stacked) and its sequential column steps."""
    lin = linears(shape)
    H = shape["hidden_size"]
    n_w = sum(N * K for _, N, K in lin)
    return {
        "forward": 2 * n_w * tokens + 4 * tokens * seq_len * H,
        "grams": 2 * tokens * sum(K * K for r, _, K in lin if r in ("q", "o", "gate", "down")),
        "proxy_per_spec": sum(2 * N * K * K for _, N, K in lin),
        "gptq_gemm": sum(N * K * K for _, N, K in lin),
        "gptq_fp64": sum(1.33 * K**3 for r, _, K in lin if r in ("q", "o", "gate", "down")),
        "gptq_columns": sum(K for r, _, K in lin if r in ("q", "o", "gate", "down")),  # stacked on the GPU
        "grams_upper": 2
        * tokens
        * sum(K * K * _upper(K) for r, _, K in lin if r in ("q", "o", "gate", "down")),
        "gptq_launch_blocks": sum(-(-K // 128) for r, _, K in lin if r in ("q", "o", "gate", "down")),
    }


def _upper(K: int, panel: int = 4096) -> float:
    """Fraction of a K x K Gram's FLOPs the upper-block-triangle accumulation computes (stats/gram.py)."""
    n = -(-K // panel)
    return 1.0 if K <= panel else (n + 1) / (2 * n)


def _cpu_block_timing(shape: dict) -> dict:
    """Wall seconds of one 70B-shaped block on this CPU (float32): its forward over 1 x 128 tokens, one
    proxy cost (int4_g128, q_proj) and the GPTQ of k_proj [1024, 8192] (8192 sequential columns)."""
    from workbench.quant.api import quantize_weight
    from workbench.streaming.devicequant import proxy_costs_here
    from workbench.streaming.skeleton import StreamedModel

    small = dict(shape, num_hidden_layers=1, vocab_size=1024)  # the vocabulary does not touch a block
    sm = StreamedModel(_source(small, 1), "cpu", torch.float32)
    t = time.perf_counter()
    block = sm.load_block(0)
    load_s = time.perf_counter() - t
    h = torch.randn(1, 128, shape["hidden_size"]) * 0.02
    pos = torch.arange(128)[None]
    emb = sm.model.model.rotary_emb(h, pos)
    with torch.no_grad():
        t = time.perf_counter()
        block(h, position_embeddings=emb, attention_mask=None, position_ids=pos)
        fwd_s = time.perf_counter() - t
        x = torch.randn(512, shape["hidden_size"], dtype=torch.float64)
        G = torch.zeros(shape["hidden_size"], shape["hidden_size"], dtype=torch.float64)
        t = time.perf_counter()
        G.addmm_(x.t(), x)
        gram_s = time.perf_counter() - t
        G = (G / 512).float()
        Wq = block.self_attn.q_proj.weight
        t = time.perf_counter()
        proxy_costs_here(Wq, G, ["int4_g128"])
        proxy_s = time.perf_counter() - t
        Wk = block.self_attn.k_proj.weight
        t = time.perf_counter()
        quantize_weight(Wk, "int4_g128:gptq", G)
        gptq_s = time.perf_counter() - t
    H = shape["hidden_size"]
    return {
        "load_block_s": load_s,
        "forward_128_tokens_s": fwd_s,
        "gram_update_512_tokens_s": gram_s,
        "proxy_q_proj_1_spec_s": proxy_s,
        "gptq_k_proj_s": gptq_s,
        "cpu_gflops_forward": 2 * sum(N * K for _, N, K in linears(shape)) * 128 / fwd_s / 1e9,
        "cpu_gflops_gram": 2 * 512 * H * H / gram_s / 1e9,
        "gptq_us_per_column_cpu": gptq_s / H * 1e6,
    }


def estimate(shape: dict) -> dict:
    """ESTIMATE of each 70B phase on an H200 (module docstring): FLOPs of the 70B shape over FLOPs of the 8B
    shape times the 8B H200 anchors; GPTQ from its GEMM FLOPs at the proxy anchor's rate, its fp64 work at
    an assumed rate and one sequential step per column at ~15 assumed kernel launches. Plus the measured CPU
    timing of one 70B-shaped block, and what the whole phase would take on this CPU at those rates."""
    from workbench.presets import LLAMA3_8B

    n70, n8 = shape["num_hidden_layers"], LLAMA3_8B["num_hidden_layers"]
    f70, f8 = phase_flops(shape, 128 * 2048, 2048), phase_flops(LLAMA3_8B, 128 * 2048, 2048)
    inspect_rate = n8 * (f8["forward"] + f8["grams"]) / ANCHOR_INSPECT_8B_S
    proxy_rate = n8 * 7 * f8["proxy_per_spec"] / ANCHOR_PROXY_8B_S  # 6 specs + the denominator
    calib = 8 * 2048
    c70 = phase_flops(shape, calib, 2048)
    est = {
        "inspect_s": n70 * (f70["forward"] + f70["grams"]) / inspect_rate,
        "scan_s": n70
        * ((c70["forward"] + c70["grams"]) / inspect_rate + 7 * c70["proxy_per_spec"] / proxy_rate),
        "gptq_s": n70
        * (
            (c70["forward"] + c70["grams"]) / inspect_rate
            + c70["gptq_gemm"] / proxy_rate
            + c70["gptq_fp64"] / (ASSUMED_FP64_TFLOPS * 1e12)
            + c70["gptq_columns"] * 15 * ASSUMED_LAUNCH_US * 1e-6
        ),
    }
    est["inspect_no_gram_s"] = n70 * f70["forward"] / inspect_rate
    est["scan_tf32_s"] = n70 * (
        (c70["forward"] + c70["grams"]) / inspect_rate
        + 7 * c70["proxy_per_spec"] / (ASSUMED_TF32_TFLOPS * 1e12)
    )
    _say("ESTIMATE (not a measurement): 70B-shaped phases on one H200, scaled from 8B H200 anchors")
    for k, v in est.items():
        phase = k.split("_")[0]
        verdict = "meets" if v < TARGETS_S[phase] else "MISSES"
        _say(f"  {k[:-2]:10s} ~{v:7.0f} s   target {TARGETS_S[phase]} s   {verdict}")
    cpu = _cpu_block_timing(shape)
    _say(
        "measured on this CPU, one 70B-shaped block (float32): "
        + json.dumps({k: round(v, 3) for k, v in cpu.items()})
    )
    return {
        "label": "ESTIMATE, not measured on a GPU",
        "anchors": {"inspect_8b_h200_s": ANCHOR_INSPECT_8B_S, "proxy_8b_h200_s": ANCHOR_PROXY_8B_S},
        "assumptions": {
            "tf32_tflops_scan_tf32": ASSUMED_TF32_TFLOPS,
            "launch_us": ASSUMED_LAUNCH_US,
            "launches_per_gptq_column": 15,
            "fp64_tflops": ASSUMED_FP64_TFLOPS,
        },
        "flops_per_block_70b_inspect": f70,
        "flops_per_block_70b_calib": c70,
        "rates_tflops": {"inspect": inspect_rate / 1e12, "proxy": proxy_rate / 1e12},
        "h200_estimate_s": est,
        "meets_targets": {k: v < TARGETS_S[k.split("_")[0]] for k, v in est.items()},
        "cpu_one_block": cpu,
    }


if __name__ == "__main__":
    main()
