"""Decode attention over a quantized KV cache, dequantized on the fly (one query token per sequence).

Layout (workbench/runtime/kvcache.py, `QuantKVSide`): per side, codes uint8 [B, Hkv, cap, D * bits / 8]
(element d of a token in byte d * bits // 8 at bit (d % (8 / bits)) * bits), fp16 scale and minimum
(`lo`, asymmetric; None when symmetric: codes offset by 2^(bits-1)), and a high-precision window
[B, Hkv, W, D] holding positions q .. n - 1 (q = the side's quantized prefix):

    keys per channel   scale / lo [B, Hkv, cap / G, D]   one per group of G tokens and channel
    values per token   scale / lo [B, Hkv, cap, D / G]   one per token and group of G channels

Split-K flash-decoding (https://crfm.stanford.edu/2023/10/12/flashdecoding.html): the grid is
(B * Hkv, n_splits); a program takes one kv head and a contiguous chunk of the n positions, and serves all
rep = Hq / Hkv query heads of that kv head at once (a q tile [rep padded to 16, D] for `tl.dot`, tf32x3:
float32-accurate), so each cache byte is read once per step. It walks its chunk in blocks of BLOCK_N tokens
with an online softmax, dequantizing each position's key and value from the codes (position < q: whole
bytes loaded, unpacked in registers) or the window, and writes its partial (row max, sum, accumulator) to a
float32 workspace; a second kernel reduces the splits of each query head by log-sum-exp. n_splits comes from
the SM count (about 4 programs per SM) and n. Head dims below 16 are zero-padded to 16.
KIVI's layout: https://arxiv.org/abs/2402.02750. Reference twin: `reference.attn_kvq_ref`.

Files: kernels/attn_kvq_planes.py (the bit-plane kernel, default), kernels/attn_kvq_dequant.py (the
dequantizing kernel), kernels/attn_kvq_common.py (shared helpers and the combine kernel); this file holds the
launcher.
"""

from __future__ import annotations

import os

import torch
import triton
from workbench.kernels.attn_kvq_common import attn_kvq_combine_kernel
from workbench.kernels.attn_kvq_dequant import attn_kvq_dequant_kernel
from workbench.kernels.attn_kvq_planes import attn_kvq_planes_kernel


def _n_splits(n: int, programs: int, device: torch.device, block_n: int) -> int:
    """Splits of the n positions so that programs * splits fills the GPU about four times over."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(-(-n // block_n), -(-4 * sms // programs)))


def _check(q: torch.Tensor, Hkv: int, n: int, block_n: int) -> None:
    B, Hq, D = q.shape
    if D & (D - 1) or Hq % Hkv or n < 1:
        raise ValueError(
            f"attn_kvq: head dim {D} must be a power of two, {Hq} query heads a multiple of {Hkv}"
            f" and {n} positions >= 1"
        )
    if block_n < 16 or block_n & (block_n - 1):
        # tl.dot(p [heads, BLOCK_N], v [BLOCK_N, D]) needs K >= 16 on the GPU (the interpreter accepts less)
        raise ValueError(f"attn_kvq: block_n {block_n} must be a power of two >= 16")


IMPLS = ("planes", "dequant")
PRECISIONS = ("tf32x3", "tf32", "fp16")
PLANES_ONLY = ("fp16",)  # dot operands rounded to 16 bits: the bit-plane kernel only


def _impl(impl: str | None) -> str:
    """The kernel to run: `impl`, else $WORKBENCH_KVQ_IMPL, else "planes"."""
    impl = impl or os.environ.get("WORKBENCH_KVQ_IMPL") or "planes"
    if impl not in IMPLS:
        raise ValueError(f"attn_kvq: kernel '{impl}' (choose {' or '.join(IMPLS)})")
    return impl


def _launch(
    q, k, v, n, qk, qv, sm_scale, block_n, n_splits, length=None, num_warps=None, prec="tf32x3", impl=None,
    num_stages=None, tail_n=None, maxnreg=None, int8_chunk=None, select_rows=False,
):  # fmt: skip
    """Both kernels; n is the (host) number of positions, or the capacity when `length` holds it on device."""
    B, Hq, D = q.shape
    Hkv, cap = k["codes"].shape[1], k["codes"].shape[2]
    _check(q, Hkv, n, block_n)
    if v["codes"].shape[2] != cap:
        raise ValueError(f"attn_kvq: key capacity {cap} != value capacity {v['codes'].shape[2]}")
    if _impl(impl) == "planes":
        kernel = attn_kvq_planes_kernel
    else:
        kernel = attn_kvq_dequant_kernel
        if prec in PLANES_ONLY or tail_n or int8_chunk or select_rows:
            raise ValueError(
                f"attn_kvq: precision '{prec}', tail_n, int8_chunk and select_rows are options of the planes"
                " kernel only"
            )
    if int8_chunk and (int8_chunk < 16 or int8_chunk & (int8_chunk - 1) or D // int8_chunk > 4):
        raise ValueError(
            f"attn_kvq: int8_chunk {int8_chunk} must be a power of two >= 16 and >= head dim {D} / 4"
        )
    tail_n = tail_n or block_n
    if tail_n < 16 or tail_n & (tail_n - 1) or tail_n > block_n:
        raise ValueError(f"attn_kvq: tail_n {tail_n} must be a power of two in [16, block_n {block_n}]")
    rep = Hq // Hkv
    block_h, d_p = max(16, triton.next_power_of_2(rep)), max(16, D)  # tl.dot wants >= 16 rows and columns
    splits = n_splits or _n_splits(n, B * Hkv, q.device, block_n)
    chunk = -(-(-(-n // splits)) // block_n) * block_n  # positions per split, a multiple of block_n
    splits = -(-n // chunk)  # every split holds >= 1 position
    rows = B * Hkv * splits * block_h  # one fp32 workspace: m, l [rows], acc [rows, d_p], then out
    ws = torch.empty(rows * (d_p + 2) + B * Hq * D, dtype=torch.float32, device=q.device)
    m, l_sum, acc = ws[:rows], ws[rows : 2 * rows], ws[2 * rows : rows * (d_p + 2)]
    out = ws[rows * (d_p + 2) :].view(B, Hq, D)

    def win(side):
        w = side["window"]
        return (w if w is not None and w.shape[2] else q.new_zeros(B, Hkv, 1, D)).contiguous()

    kw, vw = win(k), win(v)
    dev = length is not None
    if kernel is attn_kvq_planes_kernel:
        # H200 sweep (RESULTS, "Bit-plane kernel"): 4 warps, no software pipelining; Triton's default 3
        # stages need 248 KB of shared memory at D 128 / BLOCK_N 64 and do not launch (232 KB per SM)
        opts = {"num_warps": num_warps or 4, "num_stages": num_stages or 1, "TAIL_N": tail_n}
        opts["CHUNK8"] = int8_chunk if int8_chunk and int8_chunk < D else 0
        opts["SEL"] = bool(select_rows)
    else:
        opts = {"num_warps": num_warps or (4 if d_p * block_n <= 4096 else 8)}
        if num_stages:
            opts["num_stages"] = num_stages
    if maxnreg:
        opts["maxnreg"] = maxnreg  # ptxas register cap per thread (spills past it)
    kernel[(B * Hkv, splits)](
        q.contiguous(), m, l_sum, acc,
        k["codes"], k["scale"], k["lo"] if k["lo"] is not None else k["scale"], kw,
        v["codes"], v["scale"], v["lo"] if v["lo"] is not None else v["scale"], vw,
        n, qk, qv, cap, kw.shape[2], vw.shape[2], Hq, Hkv, sm_scale, chunk, splits,
        length if dev else k["codes"], k.get("residual", 0), v.get("residual", 0),
        k["bits"], k["per_channel"], k["group"], k["lo"] is None,
        v["bits"], v["per_channel"], v["group"], v["lo"] is None,
        D, d_p, block_n, block_h, dev, prec, **opts,
    )  # fmt: skip
    attn_kvq_combine_kernel[(B * Hq,)](m, l_sum, acc, out, Hq, Hkv, splits, D, d_p, block_h, 16, num_warps=4)
    return out


def attn_kvq(
    q: torch.Tensor,
    k: dict,
    v: dict,
    n: int,
    sm_scale: float,
    block_n: int = 64,
    n_splits: int | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Decode attention of q [B, Hq, D] over n cached positions; returns float32 [B, Hq, D].

    k / v: {"codes", "scale", "lo" (None: symmetric), "window" [B, Hkv, W, D], "q" (quantized prefix),
    "bits" (2, 4, 8), "per_channel" (bool), "group" (G)} as `QuantKVSide.kernel_args()` gives them.
    n_splits: how many programs share one kv head's positions (None: from the SM count and n).
    impl: "planes" (`attn_kvq_planes_kernel`, the default) or "dequant" (`attn_kvq_dequant_kernel`).
    """
    return _launch(q, k, v, n, k["q"], v["q"], sm_scale, block_n, n_splits, impl=impl)


def attn_kvq_static(
    q: torch.Tensor,
    k: dict,
    v: dict,
    length: torch.Tensor,
    sm_scale: float,
    block_n: int = 64,
    n_splits: int | None = None,
    num_warps: int | None = None,
    precision: str = "tf32x3",
    impl: str | None = None,
    num_stages: int | None = None,
    tail_n: int | None = None,
    maxnreg: int | None = None,
    int8_chunk: int | None = None,
    select_rows: bool = False,
) -> torch.Tensor:
    """`attn_kvq` with the length on the device (int64 [1]): one launch serves every step of a CUDA graph.

    k / v: `StaticKVSide.kernel_args()` (workbench/runtime/kvstatic.py): the window is a ring of W slots
    (position p in slot p % W) and "residual" is the spec's R; the quantized prefix of each side follows
    from the length in the kernel. The grid covers the capacity; splits past the length do no work.
    precision: the tl.dot input precision, "tf32x3" (float32-accurate, the default), "tf32" (one MMA
    pass, 10-bit mantissas), or, planes kernel only, "fp16" (one pass with both operands rounded to fp16:
    codes exact, q * scale and p * scale to 11-bit mantissas; half the operand registers of tf32; needs
    |q| * key scale < 65504). The one-pass precisions are checked against the twin only within the bf16
    cache's own error. (No "bf16": the Triton interpreter computes bf16 dots wrongly, so the CPU tests
    could not check it.)
    impl / num_stages: the kernel (see `attn_kvq`) and Triton's software-pipelining depth (None: its default).
    tail_n (planes kernel): the block of the masked tail loop (prefix boundary, window), a power of two
    in [16, block_n] (None: block_n); smaller tiles there lower the kernel's register peak.
    maxnreg: a cap on registers per thread (Triton's `maxnreg`; None: ptxas chooses, up to 255).
    int8_chunk (planes kernel): int8 rows cut into planes of this many consecutive channels (a power of two
    >= 16 and >= D / 4; None: one plane of D), so each dot takes a [BLOCK_N, int8_chunk] code tile.
    select_rows (planes kernel): per-channel keys whose group G divides block_n (g32 at 64) dequantize
    with each group's scale row selected instead of gathered per element (same arithmetic).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"attn_kvq_static: precision '{precision}' (choose {', '.join(PRECISIONS)})")
    cap = k["codes"].shape[2]
    return _launch(
        q, k, v, cap, 0, 0, sm_scale, block_n, n_splits, length, num_warps, precision, impl, num_stages,
        tail_n, maxnreg, int8_chunk, select_rows,
    )  # fmt: skip
