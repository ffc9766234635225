"""GEMM for larger batches / prefill with FP8 E4M3 weights, on tensor cores (``tl.dot``).

The weight tile is decoded to fp16 with integer ops (``gemv_fp8.e4m3_to_f16_scaled``: the E4M3 value
times 2**-8, exact), converted to bf16 when x is bf16 (exact: E4M3 values have 4 significant bits),
multiplied with fp32 accumulation, and scaled once per output channel by ``scale[n] * 2**8``.
The activations stay in fp16/bf16 (weight-only quantization).  Reference: ``reference.gemm_fp8_ref``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from workbench.errors import WorkbenchError
from workbench.kernels.checks import alloc_output, check_fp8_weight, finish_output, split_tiles
from workbench.kernels.gemv_fp8 import e4m3_to_f16_scaled


@triton.jit
def _gemm_fp8_kernel(
    # pointers
    x_ptr, w_ptr, s_ptr, y_ptr,
    # sizes
    M, N, K, K_TILES, TILES_PER_SPLIT,
    # strides (elements)
    stride_xm, stride_wn, stride_ym,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    DT = x_ptr.dtype.element_ty
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = m < M
    nmask = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    t_start = pid_k * TILES_PER_SPLIT
    t_end = tl.minimum(t_start + TILES_PER_SPLIT, K_TILES)
    for t in range(t_start, t_end):
        k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = k < K
        wmask = nmask[:, None] & kmask[None, :]
        b = tl.load(w_ptr + (n * stride_wn)[:, None] + k[None, :], mask=wmask, other=0)  # [BN, BK] u8
        w = e4m3_to_f16_scaled(b).to(DT)  # [BN, BK]
        xmask = mmask[:, None] & kmask[None, :]
        xt = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=xmask, other=0.0)  # [BM, BK]
        acc = tl.dot(xt, tl.trans(w), acc)
    s = tl.load(s_ptr + n, mask=nmask, other=0.0) * 256.0
    acc = acc * s[None, :]
    y_ptrs = y_ptr + m[:, None] * stride_ym + n[None, :]
    ymask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=ymask, sem="relaxed")


@dataclass(frozen=True)
class Fp8GemmConfig:
    """Launch shape of the tensor-core FP8 path."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def default_fp8_gemm_config(M: int) -> Fp8GemmConfig:
    """Hand-chosen config per batch size (see benchmarks/KERNEL_NOTES.md)."""
    if M <= 16:
        return Fp8GemmConfig(block_m=16, block_n=64, block_k=128)
    if M <= 64:
        return Fp8GemmConfig(block_m=64, block_n=64, block_k=128)
    return Fp8GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8)


def gemm_fp8(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    config: Fp8GemmConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W)^T for any number of rows, FP8 E4M3 weights, on tensor cores.

    Args:
        x: fp16/bf16 [M, K], contiguous along K.
        codes: uint8 [N, K] E4M3 bit patterns, contiguous; scales: fp32 [N].
        config: launch shape (default: ``default_fp8_gemm_config``); out: optional [M, N] output.
    Returns:
        y: [M, N] in x.dtype.
    """
    name = "gemm_fp8"
    N = check_fp8_weight(name, x, codes, scales)
    M, K = x.shape
    cfg = config or default_fp8_gemm_config(M)
    k_tiles = triton.cdiv(K, cfg.block_k)
    split, tps = split_tiles(k_tiles, cfg.split_k)
    y = alloc_output(name, out, x, N, split)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), split)
    _gemm_fp8_kernel[grid](
        x, codes, scales, y, M, N, K, k_tiles, tps, x.stride(0), codes.stride(0), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return finish_output(y, out, x.dtype)
