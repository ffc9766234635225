"""Prefill route for many rows: dequantize the packed weight once into a reused bf16/fp16 buffer, then cuBLAS.

At M >= ``dense_min_rows`` rows (prefill of a prompt) the matmul is compute bound and cuBLAS on the dense
weight beats any in-loop dequantizing GEMM here: writing W_hat [N, K] costs one pass over N*K*2 bytes
(93 us for the fused 4096 x 28672 gate/up on an H200), while the Triton GEMM ran a 2,048-token prefill 3.4x
slower than cuBLAS bf16 (``benchmarks/RESULTS.md``, issue 14, and ``benchmarks/bench_prefill.py``).

* ``decode_tile`` (``@triton.jit``): one [BLOCK_N, BLOCK_K] tile of W_hat in the activation dtype from the
  packed words (2/3/4/8-bit codes or FP8 E4M3 patterns), the decode the GEMM (``gemm_int``) uses too:
  (q - z) s in fp32 from the fp16 scale / zero, rounded once to the activation dtype (the GEMM with fp16
  activations keeps ``0x6400 | q`` read as fp16 = 1024 + q and q s - z s in fp16), the chunk-interleaved
  columns put back in order.
* ``_dequant_kernel``: grid (column blocks, K steps), each program decodes one tile and stores it.
* ``dequantize_int`` / ``dequantize_fp8``: the launchers (twins: ``reference.dequantize_int`` /
  ``dequantize_fp8``, float32); ``dense_matmul``: dequantize into the scratch buffer and ``x @ W_hat^T``.

The buffer is one per (device, dtype), grown to the largest layer seen and reused by every layer (prefill
runs the layers one after the other on one stream). While a CUDA graph is captured a fresh buffer is used.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from workbench.kernels import tune

from workbench.quant.packing import packed_k

# rows from which the dense route wins, per code width (fp8: 8), from benchmarks/bench_prefill.py on the
# H200 (issue 14): summed over the 8B fast path's four linear shapes, dense beats the Triton GEMM from 64
# rows at 2-4 bits and 128 at 8 bits, and on every shape from 128 / 256.  Tuned key "dense|min_rows|w4".
DENSE_MIN_ROWS = {2: 128, 3: 128, 4: 128, 8: 256}
# row chunks of the dense route (1: no side-stream overlap); see dense_chunks
DENSE_CHUNKS = 1


@triton.jit
def decode_tile(
    w_ptr,
    s_ptr,
    z_ptr,
    n,
    nmask,
    row_off,
    t,
    N,
    KWL,
    LO_WORDS,
    DT: tl.constexpr,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    TILES_PER_GROUP: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP8: tl.constexpr,
    MAGIC: tl.constexpr,
    OFF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    F32: tl.constexpr,
):
    """W_hat [BLOCK_N, BLOCK_K] in DT (FP8: the E4M3 value * 2**-8; the caller applies scale * 256) for K
    step t of rows n; ``row_off`` [BLOCK_N, 1] word offsets of the rows, KWL words of the (low) plane.
    F32: (q - z) s formed in fp32 from the fp16 scale and zero and rounded once to DT (bf16 needs it:
    q s - z s in bf16 rounds the scale, the product and the difference); else q s - z s in DT."""
    BKW: tl.constexpr = BLOCK_K // PER  # words per row per K step
    CW: tl.constexpr = 32 // PER  # words per 32-column chunk
    j = tl.arange(0, PER)[None, None, :]
    widx = t * BKW + tl.arange(0, BKW)  # [BKW]
    wmask = nmask[:, None] & (widx < KWL)[None, :]
    words = tl.load(w_ptr + row_off + widx[None, :], mask=wmask, other=0)  # [BN, BKW]
    if BITS == 3:
        q = (words[:, :, None] >> (j * 2)) & 3
        hw = tl.load(w_ptr + row_off + LO_WORDS + (widx // 2)[None, :], mask=wmask, other=0)
        hi16 = hw >> ((widx % 2) * 16)[None, :]
        q = q | (((hi16[:, :, None] >> j) & 1) << 2)
    else:
        q = (words[:, :, None] >> (j * BITS)) & ((1 << BITS) - 1)  # [BN, BKW, PER]
    if FP8:
        h = ((q & 0x7F) << 7) | ((q & 0x80) << 8)  # E4M3 fields -> fp16 fields (value * 2**-8)
        wq = h.to(tl.int16).to(tl.float16, bitcast=True).to(DT)
    else:
        # this K step lies in one group: W_hat = (q - z) * s
        if PER_CHANNEL:
            g = 0
        else:
            g = t // TILES_PER_GROUP
        s = tl.load(s_ptr + g * N + n, mask=nmask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + g * N + n, mask=nmask, other=0.0).to(tl.float32)
        else:
            z = tl.zeros_like(s) + (1 << (BITS - 1))
        if F32:  # 2**23 + q read as fp32 (exact, no int->float op); q - z exact; one rounding to DT
            qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            wq = ((qf - z[:, None, None]) * s[:, None, None]).to(DT)
        else:
            if MAGIC != 0:
                qf = (q | MAGIC).to(tl.int16).to(DT, bitcast=True) - OFF  # exact q, no int->float op
            else:
                qf = q.to(DT)
            wq = qf * s.to(DT)[:, None, None] - (s * z).to(DT)[:, None, None]
    # packing: slot j of word w of a 32-column chunk is column j * CW + w -> reorder to columns
    wq = tl.reshape(wq, [BLOCK_N, BKW // CW, CW, PER])
    return tl.reshape(tl.permute(wq, (0, 1, 3, 2)), [BLOCK_N, BLOCK_K])


@triton.jit
def _dequant_kernel(
    # pointers
    w_ptr,
    s_ptr,
    z_ptr,
    o_ptr,
    # sizes: KWL words of the (low) plane per row, LO_WORDS = Kp/16 (3-bit high-plane offset)
    N,
    K,
    KWL,
    LO_WORDS,
    N0,
    N_END,
    # strides (elements)
    stride_wn,
    stride_on,
    # meta-parameters
    BITS: tl.constexpr,
    PER: tl.constexpr,
    TILES_PER_GROUP: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    FP8: tl.constexpr,
    MAGIC: tl.constexpr,
    OFF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    t = tl.program_id(1)
    DT = o_ptr.dtype.element_ty
    n = N0 + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows N0 .. N_END of N
    nmask = n < N_END
    row_off = tl.multiple_of(n * stride_wn, 4)[:, None]  # rows are multiples of 16 bytes
    wq = decode_tile(
        w_ptr, s_ptr, z_ptr, n, nmask, row_off, t, N, KWL, LO_WORDS, DT, BITS, PER, TILES_PER_GROUP,
        PER_CHANNEL, HAS_ZERO, FP8, MAGIC, OFF, BLOCK_N, BLOCK_K, True,
    )  # fmt: skip
    if FP8:
        s = tl.load(s_ptr + n, mask=nmask, other=0.0) * 256.0
        wq = (wq.to(tl.float32) * s[:, None]).to(DT)
    k = t * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(o_ptr + n[:, None] * stride_on + k[None, :], wq, mask=nmask[:, None] & (k < K)[None, :])


def magic_offset(dtype: torch.dtype, bits: int, fp8: bool) -> tuple[int, int]:
    """(16-bit pattern OR-ed into a code, its float value) of the int -> float decode; (0, 0): plain cast."""
    if fp8:
        return 0, 0
    if dtype == torch.float16:
        return 0x6400, 1024
    if bits <= 4:
        return 0x4300, 128
    return 0, 0  # bf16 8-bit codes: 128 + 255 is not exact in bf16


def launch_dequant(
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
    fp8: bool,
    out: torch.Tensor,
    block_n: int = 64,
    block_k: int = 128,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Write W_hat [N, K] into ``out`` (fp16/bf16 [N, K], row stride >= K); inputs already checked.

    scales: int ``[n_groups, N]`` fp16 (zeros_t alike or None), FP8 fp32 ``[N]``; rows (n0, n1): write
    only rows n0 .. n1 - 1 of W_hat (default all)."""
    N = packed.shape[0]
    n0, n1 = rows if rows is not None else (0, N)
    per = 16 if bits == 3 else 32 // bits
    per_channel = fp8 or group_size >= K
    bk = block_k if per_channel else max(32, min(block_k, group_size))
    magic, off = magic_offset(out.dtype, bits, fp8)
    Kp = packed_k(K, bits)
    grid = (triton.cdiv(n1 - n0, block_n), triton.cdiv(K, bk))
    _dequant_kernel[grid](
        packed,
        scales,
        zeros_t if zeros_t is not None else scales,
        out,
        N,
        K,
        Kp // per,
        Kp // 16,
        n0,
        n1,
        packed.stride(0),
        out.stride(0),
        BITS=bits,
        PER=per,
        TILES_PER_GROUP=1 if per_channel else max(1, group_size // bk),
        PER_CHANNEL=per_channel,
        HAS_ZERO=zeros_t is not None,
        FP8=fp8,
        MAGIC=magic,
        OFF=off,
        BLOCK_N=block_n,
        BLOCK_K=bk,
        num_warps=4,
    )
    return out


def dequantize_int(
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Packed int weight -> W_hat [N, K] in ``dtype`` (fp16/bf16), rounded once (twin:
    ``reference.dequantize_int``, float32).  packed int32 [N, packed_words(K, bits)]; scales_t / zeros_t
    fp16 [n_groups, N] (zeros None: symmetric); group_size: power of two 32..256 or >= K."""
    out = torch.empty(packed.shape[0], K, dtype=dtype, device=packed.device)
    return launch_dequant(packed, scales_t, zeros_t, bits, group_size, K, False, out)


def dequantize_fp8(packed: torch.Tensor, scales: torch.Tensor, K: int, dtype: torch.dtype = torch.float16):
    """Packed FP8 E4M3 patterns int32 [N, Kp/4], fp32 scales [N] -> W_hat [N, K] in ``dtype`` (twin:
    ``reference.dequantize_fp8``)."""
    out = torch.empty(packed.shape[0], K, dtype=dtype, device=packed.device)
    return launch_dequant(packed, scales, None, 8, K, K, True, out)


_SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused flat buffer of >= numel elements (one per device and dtype; fresh while capturing)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.empty(numel, dtype=dtype, device=device)
    key = (device.index, dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(key, None)
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def dense_min_rows(x: torch.Tensor, bits: int, fp8: bool) -> int:
    """Rows from which the launchers take ``dense_matmul``: ``WORKBENCH_DENSE_ROWS`` (0 = never), else this
    GPU's tuned table entry ``dense|min_rows|w<bits>`` (``|fp8``), else ``DENSE_MIN_ROWS[bits]``."""
    env = os.environ.get("WORKBENCH_DENSE_ROWS")
    if env is not None:
        return int(env) or 1 << 62
    if not x.is_cuda:
        return 1 << 62  # the interpreter: the Triton GEMM is what the CPU tests check
    hit = tune.lookup("dense", f"min_rows|{'fp8' if fp8 else f'w{bits}'}", x.device)
    return int(hit[0]) if hit else DENSE_MIN_ROWS[bits]


def dense_chunks(N: int, device: torch.device) -> int:
    """Row chunks of the pipelined dense route: ``WORKBENCH_DENSE_CHUNKS`` (1 = one dequantize launch, then
    one cuBLAS call), else ``DENSE_CHUNKS``; at most N / 512 (a chunk keeps >= 512 output columns)."""
    env = os.environ.get("WORKBENCH_DENSE_CHUNKS")
    want = int(env) if env is not None else DENSE_CHUNKS
    return max(1, min(want, N // 512)) if device.type == "cuda" else 1


_SIDE: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream per device the pipelined dense route dequantizes on."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SIDE:
        _SIDE[idx] = torch.cuda.Stream(device=idx)
    return _SIDE[idx]


def _pipelined(x, packed, scales, zeros_t, bits, group_size, K, fp8, W, out, chunks):
    """Dequantize row chunk j + 1 of W_hat on the side stream while cuBLAS multiplies chunk j on the
    current one (one event per chunk; the side stream first waits for the current stream, so the scratch
    buffer's earlier readers are done and the inputs are written).  out [M, N]."""
    N = W.shape[0]
    step = (-(-N // chunks) + 63) // 64 * 64
    main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
    side.wait_stream(main)
    spans, events = [(n, min(N, n + step)) for n in range(0, N, step)], []
    with torch.cuda.stream(side):
        for span in spans:
            launch_dequant(packed, scales, zeros_t, bits, group_size, K, fp8, W, rows=span)
            events.append(torch.cuda.Event())
            events[-1].record(side)
    for (n0, n1), ev in zip(spans, events):
        main.wait_event(ev)
        torch.mm(x, W[n0:n1].t(), out=out[:, n0:n1])
    return out


def dense_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
    fp8: bool,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W_hat^T: W_hat dequantized into the scratch buffer in x.dtype, then cuBLAS
    (fp32 accumulation); ``out`` optional [M, N] in x.dtype (inputs already checked).  With
    ``dense_chunks`` > 1 the dequantize of one row chunk overlaps the previous GEMM (``_pipelined``)."""
    N = packed.shape[0]
    W = scratch(N * K, x.dtype, x.device)[: N * K].view(N, K)
    chunks = dense_chunks(N, x.device)
    if chunks > 1 and x.dim() == 2:
        if out is None:
            out = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
        return _pipelined(x, packed, scales, zeros_t, bits, group_size, K, fp8, W, out, chunks)
    launch_dequant(packed, scales, zeros_t, bits, group_size, K, fp8, W)
    if out is None:
        return x @ W.t()
    return torch.matmul(x, W.t(), out=out)
