"""W8A8 kernel benchmark (issue 16): int8 x int8 and FP8 x FP8 beside cuBLAS fp16, on the Llama-3-8B shapes.

For each shape (K x N) and rows M in 1, 16, 2048 it times, with CUDA graphs (bench_kernels.graph_time_us:
LAUNCHES calls cycling through enough weight copies that L2 cannot hold them):

    fp16             cuBLAS x @ W^T, fp16 weight and input (the baseline of every ratio)
    int8 triton      our Triton int8 path, activation quantization included (kernels/gemm_w8a8.py: at one
                     row the fused kernel, else the one-launch row quantizer + the Triton GEMM)
    int8 auto        `w8a8_int8` as the runtime calls it (the same as "int8 triton" since the 13:02 run)
    int8 fused       `gemm_w8a8_fused` (quantizer in the GEMM's prologue) at every M <= 16
    int8 quant+gemm  kernels/quant_rows.py's row quantizer, then the Triton GEMM (two launches)
    int8 _int_mm     torch._int_mm (cuBLASLt int8) on pre-quantized inputs, torch epilogue (M > 16 only)
    int8 gemm only   the Triton kernel on pre-quantized inputs (the matmul without the row quantizer)
    quant int8/fp8   the row quantizer alone (codes and scales of x)
    fp8 scaled_mm    torch._scaled_mm, E4M3 x E4M3, row-wise scales, quantization included (sm >= 8.9)
    fp8 mm only      the same on pre-quantized inputs

Every variant is first checked against its torch twin (kernels/reference.py) on the same data and the run
stops with an error naming the case if it is off (relative error > 2e-2). bf16 input for the 8-bit paths.

    python benchmarks/bench_act_kernels.py --out act_kernels.json          (one GPU, < 3 minutes on an H200)
    TRITON_INTERPRET=1 python benchmarks/bench_act_kernels.py --cpu-check  (no GPU: the checks on tiny shapes)
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as BK  # noqa: E402  (graph_time_us, copy_bandwidth: the same timing as bench_kernels)

# Llama-3-8B linears (K, N): q/o, k/v, gate/up, down
SHAPES_8B = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
ROWS = [1, 16, 2048]
TINY_SHAPES = [(64, 48), (96, 32)]
TINY_ROWS = [1, 5, 20]
TOL = 2e-2


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def _weights(N: int, K: int, device: str, gen: torch.Generator):
    """An fp16 weight and its int8 / E4M3 per-channel versions (RTN, absmax scales)."""
    W = torch.randn(N, K, generator=gen, device=device) * 0.02
    s8 = W.abs().amax(1) / 127
    w8 = torch.round(W / s8[:, None]).clamp(-128, 127).to(torch.int8)
    sf = W.abs().amax(1) / 448
    wf = (W / sf[:, None]).to(torch.float8_e4m3fn)
    return W.half(), (w8, s8.float()), (wf, sf.float())


def _deq(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Codes [M, K] and row scales [M] -> the dequantized float32 input."""
    return q.float() * s[:, None]


def variants(M: int, N: int, K: int, x: torch.Tensor, w8, wf, fp8_ok: bool) -> dict:
    """name -> (call, reference call) for one case; x [M, K] bf16."""
    from workbench.kernels import reference as R
    from workbench.kernels.gemm_w8a8 import (
        gemm_w8a8_fused,
        gemm_w8a8_int_mm,
        gemm_w8a8_triton,
        int_mm_eligible,
        quantize_rows_fp8,
        quantize_rows_int8,
        w8a8_fp8,
        w8a8_int8,
    )
    from workbench.kernels.quant_rows import quantize_rows_triton

    from workbench.quant.act import fake_quant_act

    (wq, sw), (wfq, sfw) = w8, wf
    ref8 = lambda: R.w8a8_int8_ref(x, wq, sw)  # noqa: E731
    xq, sx = quantize_rows_int8(x)
    out = {
        "int8 triton": (lambda: w8a8_int8(x, wq, sw, use_int_mm=False), ref8),
        "int8 auto": (lambda: w8a8_int8(x, wq, sw), ref8),
        "int8 gemm only": (lambda: gemm_w8a8_triton(xq, sx, wq, sw, x.dtype), ref8),
        "int8 quant+gemm": (
            lambda: gemm_w8a8_triton(*quantize_rows_triton(x, "int8"), wq, sw, x.dtype),
            ref8,
        ),
        "quant int8": (
            lambda: _deq(*quantize_rows_triton(x, "int8")),
            lambda: fake_quant_act(x.float(), "int8_tok_sym"),
        ),
    }
    if M <= 16:
        out["int8 fused"] = (lambda: gemm_w8a8_fused(x, wq, sw), ref8)
    if int_mm_eligible(M, N, K):
        out["int8 _int_mm"] = (lambda: gemm_w8a8_int_mm(xq, sx, wq, sw, x.dtype), ref8)
    if fp8_ok:
        reff = lambda: R.w8a8_fp8_ref(x, wfq, sfw)  # noqa: E731
        xf, sxf = quantize_rows_fp8(x)
        mm = lambda: torch._scaled_mm(  # noqa: E731
            xf, wfq.t(), scale_a=sxf[:, None], scale_b=sfw[None, :], out_dtype=torch.bfloat16
        )
        out["fp8 scaled_mm"] = (lambda: w8a8_fp8(x, wfq, sfw), reff)
        out["fp8 mm only"] = (mm, reff)
        out["quant fp8"] = (
            lambda: _deq(*quantize_rows_triton(x, "fp8")),
            lambda: fake_quant_act(x.float(), "fp8_e4m3_tok"),
        )
    return out


def check_case(M: int, N: int, K: int, device: str, fp8_ok: bool, gen) -> dict:
    """Every variant against its twin on one case; raises SystemExit naming the first that is off."""
    x = (torch.randn(M, K, generator=gen, device=device) * 2).to(torch.bfloat16)
    _, w8, wf = _weights(N, K, device, gen)
    errs = {}
    for name, (call, ref) in variants(M, N, K, x, w8, wf, fp8_ok).items():
        errs[name] = _rel(call(), ref())
        if not errs[name] < TOL:
            raise SystemExit(
                f"bench_act_kernels: {name} at M={M}, N={N}, K={K} is off: rel err {errs[name]:.3e}"
            )
    return errs


def time_case(M: int, N: int, K: int, fp8_ok: bool, gen) -> dict:
    """Graph-timed µs of fp16 and every variant on one case (weights cycled beyond L2)."""
    n = BK._copies(N * K)  # int8 bytes; the fp16 copies are twice as large, so this is enough for both
    ws = [_weights(N, K, "cuda", gen) for _ in range(n)]
    xs = [(torch.randn(M, K, generator=gen, device="cuda") * 2).to(torch.bfloat16) for _ in range(2)]
    xh = [x.half() for x in xs]
    res = {"K": K, "N": N, "M": M, "us": {}}
    res["us"]["fp16"] = BK.graph_time_us([(lambda x=xh[i % 2], w=w[0]: x @ w.t()) for i, w in enumerate(ws)])
    names = variants(M, N, K, xs[0], ws[0][1], ws[0][2], fp8_ok)
    for name in names:
        calls = [variants(M, N, K, xs[i % 2], w[1], w[2], fp8_ok)[name][0] for i, w in enumerate(ws)]
        res["us"][name] = BK.graph_time_us(calls)
    res["x_fp16"] = {k: res["us"]["fp16"] / v for k, v in res["us"].items()}
    return res


def table(rows: list[dict]) -> str:
    names = sorted({k for r in rows for k in r["us"]}, key=lambda k: (k != "fp16", k))
    lines = ["| K x N | rows | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [f"{r['us'][n]:.1f} ({r['x_fp16'][n]:.2f}x)" if n in r["us"] else "—" for n in names]
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the JSON results here")
    ap.add_argument("--cpu-check", action="store_true", help="no GPU: check every variant on tiny shapes")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma list of row counts")
    a = ap.parse_args()
    gen = torch.Generator(device="cuda" if torch.cuda.is_available() and not a.cpu_check else "cpu")
    gen.manual_seed(0)
    if a.cpu_check:
        cases = [(M, N, K) for K, N in TINY_SHAPES for M in TINY_ROWS]
        errs = {f"{M}x{N}x{K}": check_case(M, N, K, "cpu", True, gen) for M, N, K in cases}
        print(json.dumps(errs, indent=1))
        print("cpu check passed: every variant within", TOL, "of its twin")
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_act_kernels: no CUDA device (--cpu-check checks the kernels on the CPU)")
    props = torch.cuda.get_device_properties(0)
    BK.L2_BYTES = getattr(props, "L2_cache_size", BK.L2_BYTES) or BK.L2_BYTES
    fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
    rows_list = [int(v) for v in a.rows.split(",")]
    rows, t0 = [], datetime.datetime.now()
    for K, N in SHAPES_8B:
        for M in rows_list:
            errs = check_case(M, N, K, "cuda", fp8_ok, gen)
            r = time_case(M, N, K, fp8_ok, gen)
            r["rel_err"] = errs
            rows.append(r)
            print(f"K={K} N={N} M={M}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["us"].items()), flush=True)
    result = {
        "device": props.name,
        "torch": torch.__version__,
        "date": t0.isoformat(timespec="seconds"),
        "seconds": (datetime.datetime.now() - t0).total_seconds(),
        "launches_per_graph": BK.LAUNCHES,
        "fp8": fp8_ok,
        "rows": rows,
    }
    print(table(rows))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
