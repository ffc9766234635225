"""GEMV for 1-4 rows: y = x @ dequant(W)^T with 2/3/4/8-bit packed integer weights (CUDA cores).

Decode is memory bound, so the kernel is built to read the packed bytes once at full bandwidth and to
spend as few instructions per weight as possible:

* the packed words are loaded as a ``[BLOCK_N, C, GW]`` tile (C groups of GW words per row), K
  contiguous, so each thread issues 16-byte loads and a warp reads whole row segments;
* codes become floats without an int->float conversion (slow on the SM): ``(q | 0x4B000000)`` read as
  fp32 is ``2**23 + q``, minus ``2**23`` gives q exactly;
* the group scale and zero are applied once per group, not once per weight:
  ``y_n = sum_g s_g * (sum_{k in g} q_k x_k - z_g * sum_{k in g} x_k)`` — the inner sum is one FMA per
  weight, the x sums are shared by every row of the program;
* up to 4 rows of x reuse each decoded weight (one accumulator per row);
* optional split-K (``SPLIT_K > 1``) adds the partial sums with fp32 atomics, for narrow N.

Packing layout, scales [n_groups, N] fp16 and zeros (None = symmetric) are those of
``workbench.quant.packing``.  Reference: ``workbench.kernels.reference.gemv_int_ref``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from workbench.errors import WorkbenchError
from workbench.kernels.checks import (
    alloc_output,
    check_int_weight,
    finish_output,
    group_tile,
    split_tiles,
)
from workbench.quant.packing import packed_k


@triton.jit
def _decode_group_tile(w_ptr, row_off, widx, wmask, LO_WORDS, BITS: tl.constexpr, PER: tl.constexpr):
    """Load one [BLOCK_N, C, GW] word tile and return the codes as exact fp32 [BLOCK_N, C, GW, PER]."""
    words = tl.load(w_ptr + row_off + widx, mask=wmask, other=0)  # [BN, C, GW] int32
    j = tl.arange(0, PER)[None, None, None, :]  # code position inside a word
    if BITS == 3:
        q = (words[:, :, :, None] >> (j * 2)) & 3  # 2-bit plane, 16 codes per word
        hw = tl.load(w_ptr + row_off + LO_WORDS + (widx // 2), mask=wmask, other=0)  # 1-bit plane
        hi16 = hw >> ((widx % 2) * 16)  # the 16 high bits belonging to this low word
        q = q | (((hi16[:, :, :, None] >> j) & 1) << 2)
    else:
        q = (words[:, :, :, None] >> (j * BITS)) & ((1 << BITS) - 1)
    # exact int -> fp32 without I2F: bits 0x4B000000 | q is 2**23 + q
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _group_contrib(qf, x_ptr, xk, xmask, s, zs):
    """sum over the tile of s_g * (sum q x - z_g sum x) for one row of x -> [BLOCK_N]."""
    x = tl.load(x_ptr + xk, mask=xmask, other=0.0).to(tl.float32)  # [C, GW, PER]
    dot = tl.sum(tl.sum(qf * x[None, :, :, :], axis=3), axis=2)  # [BN, C]
    sx = tl.sum(tl.sum(x, axis=2), axis=1)  # [C]
    return tl.sum(s * dot - zs * sx[None, :], axis=1)


@triton.jit
def _gemv_int_kernel(
    # pointers
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr,
    # sizes: N outputs, K inputs, NG groups, KWL words of the (low) plane per row, LO_WORDS = Kp/16
    N, K, NG, KWL, LO_WORDS, TILES, TILES_PER_SPLIT,
    # strides (elements)
    stride_xm, stride_wn, stride_ym,
    # meta-parameters
    M_ROWS: tl.constexpr,  # rows of x (1..4), each with its own accumulator
    BITS: tl.constexpr, PER: tl.constexpr,  # bits per code; codes per word of the low plane
    GW: tl.constexpr,  # words per group (per-channel: words per tile)
    C: tl.constexpr,  # groups per tile
    PER_CHANNEL: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    nmask = n < N
    # packed rows are whole multiples of 16 bytes (packing.k_align), so 16-byte loads are legal
    row_off = tl.multiple_of(n * stride_wn, 4)[:, None, None]
    c = tl.arange(0, C)
    w = tl.arange(0, GW)
    jj = tl.arange(0, PER)
    acc0 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_start = pid_k * TILES_PER_SPLIT
    t_end = tl.minimum(t_start + TILES_PER_SPLIT, TILES)
    for t in range(t_start, t_end):
        widx = (t * C + c)[:, None] * GW + w[None, :]  # [C, GW] word index in the row
        widx3 = widx[None, :, :]
        wmask = nmask[:, None, None] & (widx3 < KWL)
        qf = _decode_group_tile(w_ptr, row_off, widx3, wmask, LO_WORDS, BITS, PER)
        xk = widx[:, :, None] * PER + jj[None, None, :]  # [C, GW, PER] column index
        xmask = xk < K
        if PER_CHANNEL:
            g = c * 0
        else:
            g = t * C + c
        gmask = nmask[:, None] & (g < NG)[None, :]
        s_off = g[None, :] * N + n[:, None]  # [BN, C] into scales [NG, N]
        s = tl.load(s_ptr + s_off, mask=gmask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zs = s * tl.load(z_ptr + s_off, mask=gmask, other=0.0).to(tl.float32)
        else:
            zs = s * (1 << (BITS - 1))
        acc0 += _group_contrib(qf, x_ptr, xk, xmask, s, zs)
        if M_ROWS > 1:
            acc1 += _group_contrib(qf, x_ptr + stride_xm, xk, xmask, s, zs)
        if M_ROWS > 2:
            acc2 += _group_contrib(qf, x_ptr + 2 * stride_xm, xk, xmask, s, zs)
        if M_ROWS > 3:
            acc3 += _group_contrib(qf, x_ptr + 3 * stride_xm, xk, xmask, s, zs)
    y_ptrs = y_ptr + n
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc0.to(y_ptr.dtype.element_ty), mask=nmask)
        if M_ROWS > 1:
            tl.store(y_ptrs + stride_ym, acc1.to(y_ptr.dtype.element_ty), mask=nmask)
        if M_ROWS > 2:
            tl.store(y_ptrs + 2 * stride_ym, acc2.to(y_ptr.dtype.element_ty), mask=nmask)
        if M_ROWS > 3:
            tl.store(y_ptrs + 3 * stride_ym, acc3.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.atomic_add(y_ptrs, acc0, mask=nmask, sem="relaxed")
        if M_ROWS > 1:
            tl.atomic_add(y_ptrs + stride_ym, acc1, mask=nmask, sem="relaxed")
        if M_ROWS > 2:
            tl.atomic_add(y_ptrs + 2 * stride_ym, acc2, mask=nmask, sem="relaxed")
        if M_ROWS > 3:
            tl.atomic_add(y_ptrs + 3 * stride_ym, acc3, mask=nmask, sem="relaxed")


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape: rows per program, words per row per tile (a power of two), split-K, warps."""

    block_n: int = 16
    tile_words: int = 64
    split_k: int = 1
    num_warps: int = 4


def default_gemv_config(M: int, N: int, K: int, bits: int) -> GemvConfig:
    """Hand-chosen config per shape class (see benchmarks/KERNEL_NOTES.md)."""
    return GemvConfig(block_n=16, tile_words=64, split_k=1, num_warps=4)


MAX_GEMV_ROWS = 4


def gemv_int(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
    config: GemvConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W)^T for 1..4 rows.

    Args:
        x: fp16/bf16 [M, K], M <= 4, contiguous along K.
        packed: int32 [N, packed_words(K, bits)] (``pack_codes``).
        scales_t: fp16 [n_groups, N]; zeros_t: fp16 [n_groups, N] or None (symmetric, zero 2**(bits-1)).
        bits: 2, 3, 4, 8; group_size: power of two 16..256, or >= K for per-channel; K: input features.
        config: launch shape (default: ``default_gemv_config``).
        out: optional [M, N] output in x.dtype to write into (every element is overwritten).
    Returns:
        y: [M, N] in x.dtype.
    """
    name = "gemv_int"
    N = check_int_weight(name, x, packed, scales_t, zeros_t, bits, group_size, K)
    M = x.shape[0]
    if M > MAX_GEMV_ROWS:
        raise WorkbenchError(
            f"{name}: x has {M} rows (shape {tuple(x.shape)}); the GEMV takes 1..4, use gemm_int"
        )
    per = 16 if bits == 3 else 32 // bits
    per_channel, G = group_tile(group_size, K, per, name)
    cfg = config or default_gemv_config(M, N, K, bits)
    Kp = packed_k(K, bits)
    kwl = Kp // per  # words of the (low) plane per row
    if per_channel:
        gw, c = cfg.tile_words, 1
        tiles = triton.cdiv(kwl, gw)
    else:
        gw = G // per
        c = max(1, cfg.tile_words // gw)
        tiles = triton.cdiv(triton.cdiv(K, G), c)
    split, tps = split_tiles(tiles, cfg.split_k)
    y = alloc_output(name, out, x, N, split)
    grid = (triton.cdiv(N, cfg.block_n), split)
    _gemv_int_kernel[grid](
        x, packed, scales_t, zeros_t if zeros_t is not None else scales_t, y,
        N, K, triton.cdiv(K, G), kwl, Kp // 16, tiles, tps,
        x.stride(0), packed.stride(0), y.stride(0),
        M_ROWS=M, BITS=bits, PER=per, GW=gw, C=c,
        PER_CHANNEL=per_channel, HAS_ZERO=zeros_t is not None,
        BLOCK_N=cfg.block_n, SPLIT_K=split, num_warps=cfg.num_warps,
    )
    return finish_output(y, out, x.dtype)
