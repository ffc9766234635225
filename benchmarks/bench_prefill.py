"""Prefill matmuls (many rows): the Triton dequantizing GEMM vs the dense route (dequantize + cuBLAS) vs bf16.

For the fast path's Llama-3-8B linears (q/k/v fused 4096 -> 6144, o 4096 -> 4096, gate/up fused 4096 ->
28672, down 14336 -> 4096), each weight format and M rows it times, with CUDA graphs over weight copies
>= 3x L2 (``kernels.tune.time_graph``, as bench_kernels does):

* ``gemm``  the Triton GEMM (``gemm_int`` / ``gemm_fp8`` with the dense route off; W4 <= 16 rows: mma);
* ``dense`` ``kernels.dequant.dense_matmul`` (one dequantize launch into the scratch buffer + cuBLAS);
* ``deq``   the dequantize launch alone; ``bf16`` cuBLAS on a dense bf16 weight of the same shape.

Each variant is checked against the float32 reference first. The smallest M at which ``dense`` beats
``gemm`` on every shape of a format is the threshold ``dense_min_rows`` should use (printed at the end).

    python benchmarks/bench_prefill.py [--rows 64,128,...] [--formats w4_g128,...] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N)
FORMATS = {"w4_g128": (4, 128, False), "w8_ch": (8, 0, True), "w3_g128": (3, 128, False),
           "w2_g64": (2, 64, False), "fp8": (8, 0, True)}  # fmt: skip


def make_weight(fmt: str, N: int, K: int) -> tuple:
    """(packed, scales, zeros, bits, G, fp8) of a random weight in `fmt`, on CUDA."""
    from workbench.quant.packing import pack_codes, prepare_fp8_params, prepare_group_params

    bits, G, sym = FORMATS[fmt]
    G = G or K
    if fmt == "fp8":
        w = (torch.randn(N, K, device="cuda") * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
        packed, scales = prepare_fp8_params(w.view(torch.uint8), torch.rand(N, device="cuda") * 0.01 + 1e-3)
        return packed, scales, None, 8, K, True
    codes = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8, device="cuda")
    ng = -(-K // G)
    scales = torch.rand(N, ng, device="cuda") * 0.02 + 0.002
    zeros = None if sym else torch.rand(N, ng, device="cuda") * (2**bits - 1)
    st, zt = prepare_group_params(scales, zeros, K, G)
    return pack_codes(codes, bits), st, zt, bits, G, False


def variants(x: torch.Tensor, w: tuple, K: int, chunks: list[int] = ()) -> dict:
    """name -> fn(packed, scales, zeros) for one weight (the graph timing rotates the weight copies);
    ``dense_c<c>`` for each c in chunks: the dense route pipelined over c row chunks (side stream)."""
    from workbench.kernels.dequant import dense_matmul, launch_dequant, scratch
    from workbench.kernels.gemm_fp8 import gemm_fp8
    from workbench.kernels.gemm_int import gemm_int

    _, _, _, bits, G, fp8 = w
    N = w[0].shape[0]

    def gemm(p, s, z):
        os.environ["WORKBENCH_DENSE_ROWS"] = "0"
        try:
            return gemm_fp8(x, p, s, K) if fp8 else gemm_int(x, p, s, z, bits, G, K)
        finally:
            del os.environ["WORKBENCH_DENSE_ROWS"]

    def deq(p, s, z):
        W = scratch(N * K, x.dtype, x.device)[: N * K].view(N, K)
        return launch_dequant(p, s.view(-1) if fp8 else s, z, bits, G, K, fp8, W)

    def dense_c(c):
        def fn(p, s, z):
            os.environ["WORKBENCH_DENSE_CHUNKS"] = str(c)
            try:
                return dense_matmul(x, p, s.view(-1) if fp8 else s, z, bits, G, K, fp8, None)
            finally:
                del os.environ["WORKBENCH_DENSE_CHUNKS"]

        return fn

    out = {"gemm": gemm, "dense": dense_c(1), "deq": deq}
    out.update({f"dense_c{c}": dense_c(c) for c in chunks})
    return out


def reference(x: torch.Tensor, w: tuple, K: int) -> torch.Tensor:
    from workbench.kernels import reference as R

    p, s, z, bits, G, fp8 = w
    return R.gemm_fp8_ref(x, p, s, K) if fp8 else R.gemm_int_ref(x, p, s, z, bits, G, K)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_case(fmt: str, K: int, N: int, rows: list[int], chunks: list[int] = (), skip=()) -> list[dict]:
    """Rows of results (us per launch) for one format and shape at every M."""
    from workbench.kernels.tune import rotated_copies, time_graph

    w = make_weight(fmt, N, K)
    copies = rotated_copies(list(w[:3]))
    dense_w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    dcopies = rotated_copies([dense_w])
    out = []
    for M in rows:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = reference(x, w, K)
        row = {"fmt": fmt, "K": K, "N": N, "M": M}
        for name, fn in variants(x, w, K, chunks).items():
            if name in skip:
                continue
            if name != "deq":
                row[f"{name}_err"] = round(rel_err(fn(*w[:3]), ref), 5)
            turn = iter(range(1 << 30))
            row[f"{name}_us"] = round(1e3 * time_graph(lambda f=fn: f(*copies[next(turn) % len(copies)])), 2)
        turn = iter(range(1 << 30))
        row["bf16_us"] = round(1e3 * time_graph(lambda: x @ dcopies[next(turn) % len(dcopies)][0].t()), 2)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def threshold(rows: list[dict]) -> dict:
    """Per format: the smallest M from which dense_us <= gemm_us on every shape (None if never)."""
    res = {}
    for fmt in sorted({r["fmt"] for r in rows}):
        mine = [r for r in rows if r["fmt"] == fmt]
        ms = sorted({r["M"] for r in mine})
        ok = [m for m in ms if all(r["dense_us"] <= r.get("gemm_us", 0) for r in mine if r["M"] >= m)]
        res[fmt] = ok[0] if ok else None
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="64,128,256,512,2048")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--chunks", default="", help="row chunks of the pipelined dense route to time too: 2,4")
    ap.add_argument("--skip", default="", help="variants not to time, e.g. gemm")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    chunks = [int(c) for c in a.chunks.split(",") if c]
    rows = [int(m) for m in a.rows.split(",")]
    res = []
    for fmt in a.formats.split(","):
        for K, N in SHAPES:
            res += bench_case(fmt, K, N, rows, chunks, a.skip.split(","))
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": res,
               "dense_from_rows": threshold(res)}  # fmt: skip
    print(json.dumps(summary["dense_from_rows"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
