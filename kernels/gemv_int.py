"""GEMV for 1-4 rows: y = x @ dequant(W)^T with packed 2/3/4/8-bit integer or FP8 E4M3 weights.

Decode is memory bound: the kernel reads the packed bytes once and spends as few instructions per
weight as it can (``benchmarks/KERNEL_NOTES.md`` has the instruction counts and timings):

* the packed words are loaded as a ``[BLOCK_N, C, GW]`` tile (C groups of GW words per row, K
  contiguous): each thread issues 16-byte loads, a warp reads whole row segments;
* no int->float conversion (a slow instruction on the SM): code j of a word is shifted into the top
  mantissa bits of 1.0, giving the fp32 ``f = 1 + q / 2**B`` in one shift and one and/or;
* scales and zeros are applied per (row, group), not per weight:
  ``sum_k (q_k - z) s x_k = s 2**B sum_k f_k x_k - s (2**B + z) sum_k x_k``, so each weight costs one FMA
  (the x sums per group are shared by all rows); keeping the 1.0 inside f keeps the fp32 sums exact
  to ~1e-7 relative (the constant is of the size of the codes, unlike the usual ``2**23 + q`` trick);
* the chunk-interleaved packing puts slot j of neighbouring words in neighbouring columns, so x for a
  slot is one 8-byte load in the words' own layout (``X_BCAST`` with several warps, see ``_row_step``);
* up to 4 rows of x reuse each decoded weight (one accumulator set per row); x values are shared by
  the rows a thread holds;
* the loads of tile t+1 are issued before tile t is computed (software pipelining by hand);
* optional split-K (``SPLIT_K > 1``) adds partial sums with fp32 atomics, for narrow N / long K.

FP8 E4M3 (``FP8=True``): the uint8 bit patterns are packed like 8-bit codes; byte j becomes the fp32
whose sign / exponent / mantissa fields are the E4M3 ones moved into place (value * 2**-120, exact for
normals and subnormals), and the per-channel scale absorbs the 2**120.  The E4M3 NaN pattern decodes as
a finite number; quantized weights never hold it.

Layout, scales ``[n_groups, N]`` fp16, zeros (None = symmetric): ``workbench.quant.packing``.
Reference: ``workbench.kernels.reference.gemv_int_ref``.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch
import triton
import triton.language as tl
from workbench.kernels import tune
from workbench.kernels.checks import (
    alloc_output,
    alloc_partials,
    check_int_weight,
    finish_output,
    fixup_enabled,
    group_tile,
    split_tiles,
    split_workspace,
)
from workbench.kernels.gemv_mma import choose_w4, finish_split, mma_eligible, w4_mma

from workbench.errors import WorkbenchError
from workbench.quant.packing import packed_k

FP8_SCALE = 2.0**120  # E4M3 fields moved into an fp32 read as value * 2**-120


@triton.jit
def _move_bits(v, src: tl.constexpr, dst: tl.constexpr):
    """Shift so that bit ``src`` lands on bit ``dst`` (the caller masks the result)."""
    if dst >= src:
        return v << (dst - src)
    else:
        return v >> (src - dst)


@triton.jit
def _code_as_float(words, j: tl.constexpr, BITS: tl.constexpr, FP8: tl.constexpr):
    """Code j of each word as fp32 built from bits alone (no int->float instruction).

    Integers: ``1 + q / 2**BITS`` (q moved into the top BITS mantissa bits of 1.0 = 0x3F800000), one
    shift and one and/or.  FP8: byte j's sign to bit 31, exponent+mantissa to bits 26..20 -> the E4M3
    value * 2**-120.
    """
    if FP8:
        bits = (_move_bits(words, 8 * j + 7, 31) & -2147483648) | (_move_bits(words, 8 * j, 20) & 0x07F00000)
    else:
        bits = (_move_bits(words, j * BITS, 23 - BITS) & (((1 << BITS) - 1) << (23 - BITS))) | 0x3F800000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _spread2(v):
    """8 two-bit fields in bits 0..15 -> one per nibble (bits 4j, 4j+1)."""
    v = (v | (v << 8)) & 0x00FF00FF
    v = (v | (v << 4)) & 0x0F0F0F0F
    return (v | (v << 2)) & 0x33333333


@triton.jit
def _spread1(v):
    """8 bits in bits 0..7 -> one per nibble (bit 4j)."""
    v = (v | (v << 12)) & 0x000F000F
    v = (v | (v << 6)) & 0x03030303
    return (v | (v << 3)) & 0x11111111


@triton.jit
def _nibbles_3bit(lo, hi16):
    """3-bit codes from the two planes -> two words of 4-bit fields (codes 0..7 and 8..15 of ``lo``).

    ``lo`` holds 16 codes' low 2 bits (bits 2j, 2j+1), ``hi16`` their high bit (bit j).  Done once per
    word (about 2 ops per code), after which each code decodes like a 4-bit one.
    """
    n0 = _spread2(lo & 0xFFFF) | (_spread1(hi16 & 0xFF) << 2)
    n1 = _spread2((lo >> 16) & 0xFFFF) | (_spread1((hi16 >> 8) & 0xFF) << 2)
    return n0, n1


@triton.jit
def _load_tile(
    w_ptr,
    s_ptr,
    z_ptr,
    row_off,
    n,
    c,
    w,
    t,
    t_end,
    N,
    NG,
    KWL,
    LO_WORDS,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GW: tl.constexpr,
    C: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """Issue the loads of tile t (words, 1-bit plane halves, scales, zeros); t >= t_end -> zeros."""
    live = n < N * (t < t_end).to(tl.int32)  # [BN]: rows in range, and the tile exists
    widx = (t * C + c)[:, None] * GW + w[None, :]  # [C, GW] word index in the (low) plane
    if EVEN_K:
        wmask = live[:, None, None]
    else:
        wmask = live[:, None, None] & (widx < KWL)[None, :, :]
    words = tl.load(w_ptr + row_off + widx[None, :, :], mask=wmask, other=0)  # [BN, C, GW]
    if BITS == 3:  # the 1-bit plane word covers two low words: take its matching half
        hw = tl.load(w_ptr + row_off + LO_WORDS + (widx // 2)[None, :, :], mask=wmask, other=0)
        hi16 = hw >> ((widx % 2) * 16)[None, :, :]
    else:
        hi16 = words
    if PER_CHANNEL:
        g = c * 0
    else:
        g = t * C + c
    gmask = live[:, None] & (g < NG)[None, :]
    s_off = g[None, :] * N + n[:, None]  # [BN, C] into scales [NG, N]
    s = tl.load(s_ptr + s_off, mask=gmask, other=0.0)
    if HAS_ZERO:
        z = tl.load(z_ptr + s_off, mask=gmask, other=0.0)
    else:
        z = s
    return words, hi16, s, z


@triton.jit
def _row_step(
    f, x_row, xk, j: tl.constexpr, K, d, BLOCK_N: tl.constexpr, EVEN_K: tl.constexpr, X_BCAST: tl.constexpr
):
    """d += f * x[k] for slot j of every word (one row of x).

    ``X_BCAST``: broadcast the x pointers over the rows before loading, so that the load gets the words'
    own layout (with several warps a [C, GW] load is otherwise laid out differently and converted
    through shared memory, with barriers); with one warp the [C, GW] load already matches.
    """
    C: tl.constexpr = xk.shape[0]
    GW: tl.constexpr = xk.shape[1]
    if X_BCAST:
        ptrs = tl.broadcast_to((x_row + xk + j)[None, :, :], [BLOCK_N, C, GW])
        if EVEN_K:
            x = tl.load(ptrs).to(tl.float32)
        else:
            x = tl.load(
                ptrs, mask=tl.broadcast_to(((xk + j) < K)[None, :, :], [BLOCK_N, C, GW]), other=0.0
            ).to(tl.float32)
        return d + f * x
    else:
        if EVEN_K:
            x = tl.load(x_row + xk + j).to(tl.float32)
        else:
            x = tl.load(x_row + xk + j, mask=(xk + j) < K, other=0.0).to(tl.float32)  # [C, GW]
        return d + f * x[None, :, :]


@triton.jit
def _group_xsum(x_row, t, K, C: tl.constexpr, G: tl.constexpr, EVEN_K: tl.constexpr):
    """Sum of x over each of the C groups (G columns) of tile t -> [C]."""
    cols = (t * C + tl.arange(0, C))[:, None] * G + tl.arange(0, G)[None, :]  # [C, G]
    if EVEN_K:
        xg = tl.load(x_row + cols).to(tl.float32)
    else:
        xg = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
    return tl.sum(xg, axis=1)


@triton.jit
def _gemv_kernel(
    # pointers
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    # sizes: N outputs, K inputs, NG groups, KWL words of the (low) plane per row, LO_WORDS = Kp/16
    N,
    K,
    NG,
    KWL,
    LO_WORDS,
    TILES,
    TILES_PER_SPLIT,
    # strides (elements)
    stride_xm,
    stride_wn,
    stride_ym,
    o_ptr,  # FIXUP: the [M, N] output (y_ptr is then the persistent fp32 workspace)
    cnt_ptr,  # FIXUP: int32 arrival counters, one per column block (persistent, left at 0)
    stride_om,
    # meta-parameters
    M_ROWS: tl.constexpr,  # rows of x (1..4), each with its own accumulators
    BITS: tl.constexpr,
    PER: tl.constexpr,  # bits per code; codes per word of the (low) plane
    GW: tl.constexpr,  # words per group (per-channel: words per tile)
    C: tl.constexpr,  # groups per tile
    PER_CHANNEL: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP8: tl.constexpr,
    EVEN_K: tl.constexpr,  # K is a multiple of the tile: no masks along K
    X_BCAST: tl.constexpr,  # load x broadcast over rows (see _row_step)
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FIXUP: tl.constexpr,  # split-K finished inside the kernel (no zero-fill / cast launches)
    PARTIALS: tl.constexpr,  # y_ptr is fp32 [SPLIT_K, M, N]: each split stores its own slice (no atomics)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    nmask = n < N
    # packed rows are whole multiples of 16 bytes (packing.k_align), so 16-byte loads are legal
    row_off = tl.multiple_of(n * stride_wn, 4)[:, None, None]
    c = tl.arange(0, C)
    w = tl.arange(0, GW)
    CW: tl.constexpr = 32 // PER  # words per 32-column chunk (of the low plane)
    XV: tl.constexpr = 4 if CW > 4 else CW  # x columns contiguous per thread (vector width hint)
    DEC: tl.constexpr = 4 if BITS == 3 else BITS  # 3-bit codes are decoded from 4-bit fields
    ONE: tl.constexpr = 1 << DEC  # integers: f = 1 + q / 2**DEC, so q = 2**DEC * (f - 1)
    acc0 = tl.zeros([BLOCK_N, C, GW], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, C, GW], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, C, GW], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, C, GW], dtype=tl.float32)
    accz0 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
    accz1 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
    accz2 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
    accz3 = tl.zeros([BLOCK_N, C], dtype=tl.float32)
    t_start = pid_k * TILES_PER_SPLIT
    t_end = tl.minimum(t_start + TILES_PER_SPLIT, TILES)
    words, hi16, s_raw, z_raw = _load_tile(
        w_ptr,
        s_ptr,
        z_ptr,
        row_off,
        n,
        c,
        w,
        t_start,
        t_end,
        N,
        NG,
        KWL,
        LO_WORDS,
        BITS,
        BLOCK_N,
        GW,
        C,
        PER_CHANNEL,
        HAS_ZERO,
        EVEN_K,
    )
    for t in range(t_start, t_end):
        nwords, nhi16, ns_raw, nz_raw = _load_tile(
            w_ptr,
            s_ptr,
            z_ptr,
            row_off,
            n,
            c,
            w,
            t + 1,
            t_end,
            N,
            NG,
            KWL,
            LO_WORDS,
            BITS,
            BLOCK_N,
            GW,
            C,
            PER_CHANNEL,
            HAS_ZERO,
            EVEN_K,
        )
        # per (row, group): contribution a * sum(f x) - b * sum(x)
        s = s_raw.to(tl.float32)
        if FP8:
            a = (s * 1.329227995784916e36)[:, :, None]  # 2**120
            b = s
        else:
            if HAS_ZERO:
                z = z_raw.to(tl.float32)
            else:
                z = tl.zeros([BLOCK_N, C], dtype=tl.float32) + (1 << (BITS - 1))
            a = (s * ONE)[:, :, None]
            b = s * (z + ONE)  # [BN, C]
        # column of slot 0 of each word: a 32-column chunk is CW = 32 / PER words, slot j of chunk word w
        # is column j * CW + w (packing layout), so x for fixed j is contiguous across a chunk's words
        xk = (t * C + c)[:, None] * (GW * PER) + ((w // CW) * 32 + (w % CW))[None, :]  # [C, GW]
        xk = tl.max_contiguous(tl.multiple_of(xk, [1, XV]), [1, XV])
        d0 = tl.zeros([BLOCK_N, C, GW], dtype=tl.float32)
        d1 = tl.zeros([BLOCK_N, C, GW], dtype=tl.float32)
        d2 = tl.zeros([BLOCK_N, C, GW], dtype=tl.float32)
        d3 = tl.zeros([BLOCK_N, C, GW], dtype=tl.float32)
        if BITS == 3:
            n0, n1 = _nibbles_3bit(words, hi16)
        else:
            n0, n1 = words, words
        for j in tl.static_range(PER):
            if BITS == 3:
                if j < 8:
                    f = _code_as_float(n0, j, 4, FP8)
                else:
                    f = _code_as_float(n1, j - 8, 4, FP8)
            else:
                f = _code_as_float(words, j, BITS, FP8)  # [BN, C, GW]
            d0 = _row_step(f, x_ptr, xk, CW * j, K, d0, BLOCK_N, EVEN_K, X_BCAST)
            if M_ROWS > 1:
                d1 = _row_step(f, x_ptr + stride_xm, xk, CW * j, K, d1, BLOCK_N, EVEN_K, X_BCAST)
            if M_ROWS > 2:
                d2 = _row_step(f, x_ptr + 2 * stride_xm, xk, CW * j, K, d2, BLOCK_N, EVEN_K, X_BCAST)
            if M_ROWS > 3:
                d3 = _row_step(f, x_ptr + 3 * stride_xm, xk, CW * j, K, d3, BLOCK_N, EVEN_K, X_BCAST)
        acc0 += a * d0
        if M_ROWS > 1:
            acc1 += a * d1
        if M_ROWS > 2:
            acc2 += a * d2
        if M_ROWS > 3:
            acc3 += a * d3
        if not FP8:  # the zero-point / offset term, once per (row, group)
            accz0 += b * _group_xsum(x_ptr, t, K, C, GW * PER, EVEN_K)[None, :]
            if M_ROWS > 1:
                accz1 += b * _group_xsum(x_ptr + stride_xm, t, K, C, GW * PER, EVEN_K)[None, :]
            if M_ROWS > 2:
                accz2 += b * _group_xsum(x_ptr + 2 * stride_xm, t, K, C, GW * PER, EVEN_K)[None, :]
            if M_ROWS > 3:
                accz3 += b * _group_xsum(x_ptr + 3 * stride_xm, t, K, C, GW * PER, EVEN_K)[None, :]
        words, hi16, s_raw, z_raw = nwords, nhi16, ns_raw, nz_raw
    y_ptrs = y_ptr + n
    if PARTIALS:  # this split's slice of the partials; plain stores
        y_ptrs += pid_k * (M_ROWS * stride_ym)
    ATOMIC: tl.constexpr = SPLIT_K > 1 and not PARTIALS
    _store_row(y_ptrs, acc0, accz0, nmask, ATOMIC)
    if M_ROWS > 1:
        _store_row(y_ptrs + stride_ym, acc1, accz1, nmask, ATOMIC)
    if M_ROWS > 2:
        _store_row(y_ptrs + 2 * stride_ym, acc2, accz2, nmask, ATOMIC)
    if M_ROWS > 3:
        _store_row(y_ptrs + 3 * stride_ym, acc3, accz3, nmask, ATOMIC)
    if FIXUP:  # the last of the SPLIT_K programs of this column block casts, writes and re-zeroes
        tl.debug_barrier()  # every thread's atomic add issued before the release below
        seen = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if seen == SPLIT_K - 1:
            finish_split(y_ptr, o_ptr, cnt_ptr, pid_n, M_ROWS, N, stride_ym, stride_om, BLOCK_N)


@triton.jit
def _store_row(y_ptrs, acc, accz, nmask, ATOMIC: tl.constexpr):
    y = tl.sum(tl.sum(acc, axis=2), axis=1) - tl.sum(accz, axis=1)  # [BN]
    if ATOMIC:
        tl.atomic_add(y_ptrs, y, mask=nmask, sem="relaxed")
    else:
        tl.store(y_ptrs, y.to(y_ptrs.dtype.element_ty), mask=nmask)


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape: rows per program, words per row per tile (a power of two), split-K, warps."""

    block_n: int = 16
    tile_words: int = 128
    split_k: int = 1
    num_warps: int = 4


def default_gemv_config(M: int, N: int, K: int, bits: int) -> GemvConfig:
    """Heuristic launch shape (H100 sweeps, ``benchmarks/KERNEL_NOTES.md``): the CPU/interpreter choice,
    and on CUDA the fallback while a graph is captured; otherwise ``kernels.tune`` picks per GPU."""
    if bits == 8:
        if N <= 4096:
            return GemvConfig(block_n=8, tile_words=128, split_k=4, num_warps=1)
        return GemvConfig(block_n=4, tile_words=128, split_k=1, num_warps=1)
    if bits == 3:
        return GemvConfig(block_n=8 if M <= 2 else 4, tile_words=64, split_k=1, num_warps=1)
    if M >= 3:
        return GemvConfig(block_n=8, tile_words=128, split_k=1, num_warps=4)
    if bits == 4 and N <= 4096:
        return GemvConfig(block_n=8, tile_words=128, split_k=2, num_warps=1)
    return GemvConfig(block_n=16, tile_words=128, split_k=1, num_warps=4)


MAX_GEMV_ROWS = 4


def launch_gemv(
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
    config: GemvConfig | None,
    out: torch.Tensor | None,
    partials: bool = False,
) -> torch.Tensor:
    """Shared launch for ``gemv_int`` / ``gemv_fp8`` (inputs already checked).  ``partials`` (with an
    explicit ``config``): return the fp32 [split, M, N] per-split sums instead (``out`` is then such a
    buffer); the caller sums them (``kernels/split_partials.py``)."""
    assert config is not None or not partials, f"{name}: a partials launch needs its planned config"
    M = x.shape[0]
    if M > MAX_GEMV_ROWS:
        raise WorkbenchError(
            f"{name}: x has {M} rows (shape {tuple(x.shape)}); the GEMV takes 1..4, use the GEMM"
        )
    per = 16 if bits == 3 else 32 // bits
    per_channel, G = group_tile(group_size, K, per, name)
    if config is None and not fp8 and mma_eligible(x, bits, group_size, K):  # W4, fp16 x, <= 16 rows

        def run_other(c, o, p, s, z):
            return launch_gemv(name, x, p, s, z, bits, group_size, K, N, fp8, GemvConfig(*c), o)

        ch = choose_w4(x, packed, scales_t, zeros_t, group_size, K, N, tune.GEMV_CANDIDATES, run_other)
        if ch[0] == 0:
            return w4_mma(x, packed, scales_t, zeros_t, group_size, K, N, out, ch[1:])
        config = GemvConfig(*ch[1:])
    cfg = config or default_gemv_config(M, N, K, bits)
    if config is None and tune.tunable(x):  # per-GPU choice among tune.GEMV_CANDIDATES, cached

        def make_run():  # only when a timing pass runs: scratch output, rotated weight copies
            o = torch.empty(M, N, dtype=x.dtype, device=x.device)
            return tune.rotating_runner(
                lambda c, p, s, z: launch_gemv(
                    name, x, p, s, z, bits, group_size, K, N, fp8, GemvConfig(*c), o
                ),
                [packed, scales_t, zeros_t],
            )

        key = tune.shape_key(x, N, K, bits, group_size, zeros_t is not None, fp8)
        cfg = GemvConfig(*tune.pick("gemv", key, x.device, tune.GEMV_CANDIDATES, make_run, astuple(cfg)))
    Kp = packed_k(K, bits)
    kwl = Kp // per  # words of the (low) plane per row
    gw, c, tiles = gemv_tiles(cfg, K, bits, group_size)
    split, tps = split_tiles(tiles, cfg.split_k)
    ws = split_workspace(x, N, cfg.block_n) if split > 1 and fixup_enabled(True) and not partials else None
    if partials:
        y = alloc_partials(name, out, x, N, split)
    else:
        y = alloc_output(name, out, x, N, 1 if ws is not None else split)
    grid = (triton.cdiv(N, cfg.block_n), split)
    _gemv_kernel[grid](
        x,
        packed,
        scales_t,
        zeros_t if zeros_t is not None else scales_t,
        y if ws is None else ws[0],
        N,
        K,
        triton.cdiv(K, G),
        kwl,
        Kp // 16,
        tiles,
        tps,
        x.stride(0),
        packed.stride(0),
        y.stride(-2) if ws is None else ws[0].stride(0),
        y,
        y if ws is None else ws[1],
        y.stride(-2),
        M_ROWS=M,
        BITS=bits,
        PER=per,
        GW=gw,
        C=c,
        PER_CHANNEL=per_channel,
        HAS_ZERO=zeros_t is not None,
        FP8=fp8,
        EVEN_K=K % (c * gw * per) == 0,
        X_BCAST=cfg.num_warps > 1 and bits != 3,
        BLOCK_N=cfg.block_n,
        SPLIT_K=split,
        FIXUP=ws is not None,
        PARTIALS=partials,
        num_warps=cfg.num_warps,
    )
    return y if partials else finish_output(y, out, x.dtype)


def gemv_tiles(cfg: GemvConfig, K: int, bits: int, group_size: int) -> tuple[int, int, int]:
    """(words per group of a tile GW, groups per tile C, tiles along K) of a launch shape."""
    per = 16 if bits == 3 else 32 // bits
    kwl = packed_k(K, bits) // per  # words of the (low) plane per row
    if group_size >= K:  # per channel: one tile of gw words per step, no wider than the row
        gw = min(cfg.tile_words, triton.next_power_of_2(kwl))
        return gw, 1, triton.cdiv(kwl, gw)
    gw = group_size // per  # c whole groups per step, no more than the row has
    c = max(1, min(cfg.tile_words // gw, triton.next_power_of_2(triton.cdiv(K, group_size))))
    return gw, c, triton.cdiv(triton.cdiv(K, group_size), c)


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
    """y = x @ dequant(W)^T for 1..4 rows, integer weights.

    Args:
        x: fp16/bf16 [M, K], M <= 4, contiguous along K.
        packed: int32 [N, packed_words(K, bits)] (``pack_codes``).
        scales_t: fp16 [n_groups, N]; zeros_t: fp16 [n_groups, N] or None (symmetric, zero 2**(bits-1)).
        bits: 2, 3, 4, 8; group_size: power of two 32..256, or >= K for per-channel; K: input features.
        config: launch shape of this kernel.  None: on CUDA, 4-bit weights with fp16 x run the
            tensor-core kernel (``gemv_mma``, shape tuned per GPU), the rest ``default_gemv_config``.
        out: optional [M, N] output in x.dtype to write into (every element is overwritten).
    Returns:
        y: [M, N] in x.dtype.
    """
    N = check_int_weight("gemv_int", x, packed, scales_t, zeros_t, bits, group_size, K)
    return launch_gemv("gemv_int", x, packed, scales_t, zeros_t, bits, group_size, K, N, False, config, out)
