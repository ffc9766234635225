"""GEMV for 1-4 rows with FP8 E4M3 weights: y = x @ (fp8(W) * scale[n])^T on CUDA cores.

Weights are the uint8 bit patterns of ``torch.float8_e4m3fn`` ``[N, K]`` (no packing) with an fp32
per-output-channel scale ``[N]``.  Decoding uses integer ops only, so it runs the same in the Triton
interpreter and on any GPU: moving the 7 low bits (exponent + mantissa) up by 7 and the sign up by 8
gives an fp16 whose value is exactly the E4M3 value times 2**-8 (normals and subnormals alike; the
scale absorbs the 2**8).  The E4M3 NaN pattern (S.1111.111) decodes to +-480 instead of NaN; quantized
weights never hold it.  Reference: ``reference.gemv_fp8_ref``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from workbench.errors import WorkbenchError
from workbench.kernels.checks import alloc_output, check_fp8_weight, finish_output, split_tiles


@triton.jit
def e4m3_to_f16_scaled(b):
    """uint8 E4M3 bit patterns -> fp16 holding value * 2**-8 (exact)."""
    b32 = b.to(tl.int32)
    h = ((b32 & 0x7F) << 7) | ((b32 & 0x80) << 8)
    return h.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _row_dot(w, x_ptr, k, kmask):
    x = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)  # [BK]
    return tl.sum(w * x[None, :], axis=1)


@triton.jit
def _gemv_fp8_kernel(
    # pointers
    x_ptr, w_ptr, s_ptr, y_ptr,
    # sizes
    N, K, TILES, TILES_PER_SPLIT,
    # strides (elements)
    stride_xm, stride_wn, stride_ym,
    # meta-parameters
    M_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    row_off = (n * stride_wn)[:, None]
    acc0 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_start = pid_k * TILES_PER_SPLIT
    t_end = tl.minimum(t_start + TILES_PER_SPLIT, TILES)
    for t in range(t_start, t_end):
        k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = k < K
        b = tl.load(w_ptr + row_off + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
        w = e4m3_to_f16_scaled(b).to(tl.float32)  # [BN, BK]
        acc0 += _row_dot(w, x_ptr, k, kmask)
        if M_ROWS > 1:
            acc1 += _row_dot(w, x_ptr + stride_xm, k, kmask)
        if M_ROWS > 2:
            acc2 += _row_dot(w, x_ptr + 2 * stride_xm, k, kmask)
        if M_ROWS > 3:
            acc3 += _row_dot(w, x_ptr + 3 * stride_xm, k, kmask)
    s = tl.load(s_ptr + n, mask=nmask, other=0.0) * 256.0
    y_ptrs = y_ptr + n
    if SPLIT_K == 1:
        tl.store(y_ptrs, (acc0 * s).to(y_ptr.dtype.element_ty), mask=nmask)
        if M_ROWS > 1:
            tl.store(y_ptrs + stride_ym, (acc1 * s).to(y_ptr.dtype.element_ty), mask=nmask)
        if M_ROWS > 2:
            tl.store(y_ptrs + 2 * stride_ym, (acc2 * s).to(y_ptr.dtype.element_ty), mask=nmask)
        if M_ROWS > 3:
            tl.store(y_ptrs + 3 * stride_ym, (acc3 * s).to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.atomic_add(y_ptrs, acc0 * s, mask=nmask, sem="relaxed")
        if M_ROWS > 1:
            tl.atomic_add(y_ptrs + stride_ym, acc1 * s, mask=nmask, sem="relaxed")
        if M_ROWS > 2:
            tl.atomic_add(y_ptrs + 2 * stride_ym, acc2 * s, mask=nmask, sem="relaxed")
        if M_ROWS > 3:
            tl.atomic_add(y_ptrs + 3 * stride_ym, acc3 * s, mask=nmask, sem="relaxed")


@dataclass(frozen=True)
class Fp8GemvConfig:
    """Launch shape: rows per program, K bytes per tile, split-K, warps."""

    block_n: int = 16
    block_k: int = 512
    split_k: int = 1
    num_warps: int = 4


def gemv_fp8(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    config: Fp8GemvConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W)^T for 1..4 rows, FP8 E4M3 weights.

    Args:
        x: fp16/bf16 [M, K], M <= 4, contiguous along K.
        codes: uint8 [N, K] E4M3 bit patterns, contiguous; scales: fp32 [N].
        config: launch shape; out: optional [M, N] output in x.dtype (fully overwritten).
    Returns:
        y: [M, N] in x.dtype.
    """
    name = "gemv_fp8"
    N = check_fp8_weight(name, x, codes, scales)
    M, K = x.shape
    if M > 4:
        raise WorkbenchError(
            f"{name}: x has {M} rows (shape {tuple(x.shape)}); the GEMV takes 1..4, use gemm_fp8"
        )
    cfg = config or Fp8GemvConfig()
    tiles = triton.cdiv(K, cfg.block_k)
    split, tps = split_tiles(tiles, cfg.split_k)
    y = alloc_output(name, out, x, N, split)
    grid = (triton.cdiv(N, cfg.block_n), split)
    _gemv_fp8_kernel[grid](
        x, codes, scales, y, N, K, tiles, tps, x.stride(0), codes.stride(0), y.stride(0),
        M_ROWS=M, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, num_warps=cfg.num_warps,
    )
    return finish_output(y, out, x.dtype)
