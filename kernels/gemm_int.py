"""GEMM for larger batches / prefill: y = x @ dequant(W)^T on tensor cores (``tl.dot``), 2/3/4/8-bit.

Per K step the program loads an x tile ``[BLOCK_M, BLOCK_K]`` and a packed word tile
``[BLOCK_N, BLOCK_K / PER]``, decodes it (``dequant.decode_tile``, shared with the prefill route) and
accumulates ``x @ W_hat^T`` on the tensor cores in fp32.  ``BLOCK_K`` divides the group size, so a K step
lies in one group.  fp16 activations: ``0x6400 | q`` read as fp16 is ``1024 + q`` (subtracting the offset
is exact, no int->float conversion), ``W_hat = q * s - z * s`` in fp16.  bf16 activations: ``(q - z) * s``
in fp32 from the fp16 scale and zero, rounded once to bf16 (in bf16 the scale, the product and the
difference each rounded: up to ~2x the error of one rounding, 0.0083 relative on an int8 case of
tests/test_runtime_cuda.py, H200).  Either way W_hat is rounded to fp16/bf16 as a dense weight would be.

FP8 E4M3 (``FP8=True``, packed like 8-bit codes): each byte becomes an fp16 with integer ops (its 7
exponent+mantissa bits moved up by 7, the sign by 8: the E4M3 value * 2**-8, exact), converted to bf16
for bf16 activations (exact: 4 significant bits), and the per-channel scale absorbs the 2**8.

Packing layout and scale form: ``workbench.quant.packing``.  Reference: ``reference.gemm_int_ref``.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch
import triton
import triton.language as tl
from workbench.kernels import tune
from workbench.kernels.checks import (
    alloc_output,
    check_int_weight,
    finish_output,
    group_tile,
    split_tiles,
)
from workbench.kernels.dequant import decode_tile, dense_matmul, dense_min_rows, magic_offset
from workbench.kernels.gemv_mma import choose_w4, mma_eligible, w4_mma

from workbench.errors import WorkbenchError
from workbench.quant.packing import packed_k


@triton.jit
def _gemm_int_kernel(
    # pointers
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    # sizes: KWL words of the (low) plane per row, LO_WORDS = Kp/16 (3-bit high-plane offset)
    M,
    N,
    K,
    KWL,
    LO_WORDS,
    K_TILES,
    TILES_PER_SPLIT,
    # strides (elements)
    stride_xm,
    stride_wn,
    stride_ym,
    # meta-parameters
    BITS: tl.constexpr,
    PER: tl.constexpr,  # bits per code; codes per word of the (low) plane
    TILES_PER_GROUP: tl.constexpr,  # K steps per group (ignored per-channel)
    PER_CHANNEL: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP8: tl.constexpr,
    MAGIC: tl.constexpr,
    OFF: tl.constexpr,  # 16-bit pattern OR-ed into the code and its float value
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    F32: tl.constexpr,  # decode_tile forms (q - z) s in fp32, one rounding (bf16 activations)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    DT = x_ptr.dtype.element_ty
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mmask = m < M
    nmask = n < N
    row_off = tl.multiple_of(n * stride_wn, 4)[:, None]  # rows are multiples of 16 bytes
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    t_start = pid_k * TILES_PER_SPLIT
    t_end = tl.minimum(t_start + TILES_PER_SPLIT, K_TILES)
    for t in range(t_start, t_end):
        wq = decode_tile(
            w_ptr, s_ptr, z_ptr, n, nmask, row_off, t, N, KWL, LO_WORDS, DT, BITS, PER, TILES_PER_GROUP,
            PER_CHANNEL, HAS_ZERO, FP8, MAGIC, OFF, BLOCK_N, BLOCK_K, F32,
        )  # fmt: skip
        k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        xt = tl.load(
            x_ptr + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & (k < K)[None, :], other=0.0
        )  # [BM, BK]
        acc = tl.dot(xt, tl.trans(wq), acc)
    if FP8:
        acc = acc * (tl.load(s_ptr + n, mask=nmask, other=0.0) * 256.0)[None, :]
    y_ptrs = y_ptr + m[:, None] * stride_ym + n[None, :]
    ymask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=ymask, sem="relaxed")


@dataclass(frozen=True)
class GemmConfig:
    """Launch shape of the tensor-core path."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def default_gemm_config(M: int, N: int, K: int, bits: int) -> GemmConfig:
    """Hand-chosen config per batch size, from the H100 sweeps in benchmarks/KERNEL_NOTES.md."""
    if M <= 16:
        return GemmConfig(block_m=16, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=3)
    if M <= 64:
        return GemmConfig(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=3)
    return GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


def launch_gemm(
    name: str,
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
    N: int,
    fp8: bool,
    config: GemmConfig | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Shared launch for ``gemm_int`` / ``gemm_fp8`` (inputs already checked)."""
    M = x.shape[0]
    per = 16 if bits == 3 else 32 // bits
    per_channel, G = group_tile(group_size, K, per, name)
    if config is None and M >= dense_min_rows(x, bits, fp8):  # prefill: dequantize once, then cuBLAS
        return dense_matmul(x, packed, scales_t, zeros_t, bits, group_size, K, fp8, out)
    if config is None and not fp8 and mma_eligible(x, bits, group_size, K):  # W4, fp16 x, <= 16 rows

        def run_other(c, o, p, s, z):
            return launch_gemm(name, x, p, s, z, bits, group_size, K, N, fp8, GemmConfig(*c), o)

        ch = choose_w4(x, packed, scales_t, zeros_t, group_size, K, N, tune.GEMM_CANDIDATES_16, run_other)
        if ch[0] == 0:
            return w4_mma(x, packed, scales_t, zeros_t, group_size, K, N, out, ch[1:])
        config = GemmConfig(*ch[1:])
    cfg = config or default_gemm_config(M, N, K, bits)
    if config is None and tune.tunable(x):  # per-GPU choice among the tune.GEMM_CANDIDATES*, cached
        cands = tune.GEMM_CANDIDATES_16 if M <= 16 else tune.GEMM_CANDIDATES

        def make_run():  # only when a timing pass runs: scratch output, rotated weight copies
            o = torch.empty(M, N, dtype=x.dtype, device=x.device)
            return tune.rotating_runner(
                lambda c, p, s, z: launch_gemm(
                    name, x, p, s, z, bits, group_size, K, N, fp8, GemmConfig(*c), o
                ),
                [packed, scales_t, zeros_t],
            )

        key = tune.shape_key(x, N, K, bits, group_size, zeros_t is not None, fp8)
        cfg = GemmConfig(*tune.pick("gemm", key, x.device, cands, make_run, astuple(cfg)))
    bk = cfg.block_k if per_channel else min(cfg.block_k, G)
    bk = max(bk, 32)  # whole 32-column chunks
    if not per_channel and G % bk:
        raise WorkbenchError(f"{name}: block_k={bk} must divide group_size={G}")
    k_tiles = triton.cdiv(K, bk)
    split, tps = split_tiles(k_tiles, cfg.split_k)
    magic, off = magic_offset(x.dtype, bits, fp8)
    y = alloc_output(name, out, x, N, split)
    Kp = packed_k(K, bits)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), split)
    _gemm_int_kernel[grid](
        x,
        packed,
        scales_t,
        zeros_t if zeros_t is not None else scales_t,
        y,
        M,
        N,
        K,
        Kp // per,
        Kp // 16,
        k_tiles,
        tps,
        x.stride(0),
        packed.stride(0),
        y.stride(0),
        BITS=bits,
        PER=per,
        TILES_PER_GROUP=max(1, G // bk),
        PER_CHANNEL=per_channel,
        HAS_ZERO=zeros_t is not None,
        FP8=fp8,
        MAGIC=magic,
        OFF=off,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=bk,
        SPLIT_K=split,
        F32=x.dtype == torch.bfloat16,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return finish_output(y, out, x.dtype)


def gemm_int(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W)^T for any number of rows, on tensor cores.

    Args:
        x: fp16/bf16 [M, K], contiguous along K.
        packed: int32 [N, packed_words(K, bits)] (``pack_codes``).
        scales_t: fp16 [n_groups, N]; zeros_t: fp16 [n_groups, N] or None (symmetric, zero 2**(bits-1)).
        bits: 2, 3, 4, 8; group_size: power of two 32..256, or >= K for per-channel; K: input features.
        config: launch shape (default: ``default_gemm_config``).
        out: optional [M, N] output in x.dtype (every element is overwritten).
    Returns:
        y: [M, N] in x.dtype.
    """
    N = check_int_weight("gemm_int", x, packed, scales_t, zeros_t, bits, group_size, K)
    return launch_gemm("gemm_int", x, packed, scales_t, zeros_t, bits, group_size, K, N, False, config, out)
