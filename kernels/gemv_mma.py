"""W4 dequant-matmul for 1..16 rows on the tensor cores, decoded straight into the mma fragments (CUDA).

``y = x @ dequant(W)^T`` for 4-bit codes (group size a power of two >= 32, or per channel), fp16 or
bf16 activations, M <= 16 rows.  The weights are the A operand of ``mma.sync.m16n8k16`` (16 output
channels x 16 k), x the B operand (k x 8 rows of x).  A warp owns 16 channels and walks K in steps of
128 columns.  Lane L = 4 g + q loads 16 bytes from each of its two rows (channels g and g + 8 of the
warp's 16): the 4 packed words (32 codes) of chunk q, columns 32 q .. 32 q + 31 of the step.  Those
are exactly the lane's A fragments for 8 k-steps, so each lane decodes its own words into the
registers the tensor cores read: no shared-memory round trip, no layout conversion.

Decode (inline PTX in ``w4_mma_asm``, ``tl.inline_asm_elementwise`` with ``pack=8`` = the lane's two
16-byte loads): ``prmt`` puts byte j of words (2u, 2u+1) into the two halves of one register (two
adjacent columns: the matching x pair is one 32-bit word of x, the B fragment as loaded); ``lop3`` ORs
the nibbles into fp16 / bf16 exponent bits, two codes per instruction; then either the *exact* scheme
(A = q, the scale and zero point applied in fp32 after the mma, once per step: bf16, and fp16 <= 8 rows
with groups >= 128 or per channel) or the *rounded* one (A = fp16(q s) by one ``fma`` per two codes,
plus an mma with the constant A = -z s: fp16 with smaller groups or 9-16 rows).  Schemes, constants and
papers: ``kernels/w4_mma_asm.py``.

Rows of x: lane g supplies x row min(g, M - 1) as mma column g (one-row GEMV: loaded once per lane
and broadcast); for M > 8 a second mma per step takes rows 8..15.  The accumulators (c0, c1 = y rows
2q, 2q+1 of channel g; c2, c3 the same for channel g + 8) ride in a ``[BLOCK_N, 16]`` fp32 tensor in
the words' layout and are stored by predicated PTX stores (``_store``).  SASS: ~2.7 instructions per
weight in the K loop (``python benchmarks/profile_kernel.py --sass``; ``benchmarks/KERNEL_NOTES.md``).

This relies on Triton giving the ``[BLOCK_N, 16]`` int32 loads the layout sizePerThread [1, 4],
threadsPerWarp [8, 4], warps stacked along rows (``BLOCK_N = 16 * num_warps``); ``_check_layout``
refuses a compiled variant that differs, and the CUDA tests check the results.  The Triton
interpreter cannot run inline PTX: on the CPU the launchers use the ``gemv_int`` / ``gemm_int`` kernels.
The default W4 path at <= 16 rows on CUDA (``WORKBENCH_W4_MMA=0`` turns it off); measured on the H200
in ``benchmarks/RESULTS.md`` ("Kernels on the H200 (issue 13)").
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from workbench.kernels.checks import (
    alloc_output,
    alloc_partials,
    finish_output,
    fixup_enabled,
    split_workspace,
)
from workbench.kernels.w4_mma_asm import w4_asm

from workbench.errors import WorkbenchError

STEP_COLS = 128  # columns per K step: 4 lanes x 32-column chunks
STEP = tl.constexpr(STEP_COLS)
MAX_ROWS = 16


@triton.jit
def _x_pairs(x32, m, t, c, K2, b: tl.constexpr, live, EVEN_K: tl.constexpr):
    """int32 x pair 4 b + (c % 4) of chunk c // 4 of step t, row offset m ([1, 16] or [BN, 16]); 0 when
    not ``live`` (a step past the program's end) or past K."""
    p = t * 64 + (c // 4) * 16 + 4 * b + (c % 4)  # [1, 16] pair index along K
    p = tl.max_contiguous(tl.multiple_of(p, [1, 4]), [1, 4])
    if EVEN_K:
        return tl.load(x32 + m + p, mask=live & (m >= 0), other=0)
    else:
        return tl.load(x32 + m + p, mask=live & (p < K2) & (m >= 0), other=0)


@triton.jit
def _ld16(ptrs, mask):
    """fp16 gather as inline PTX: a ``tl.load`` of these row-contiguous pointers would make Triton
    re-lay the loop out column-major (see ``_store``)."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b16 $0, 0; @p ld.global.b16 $0, [$1]; }",
        "=h,l,r",
        (ptrs.to(tl.uint64, bitcast=True), mask.to(tl.int32)),
        dtype=tl.float16,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _load_step(x32, w_row, s_ptr, z_ptr, n, nmask, mx, c, t, t1, N, K2, KWL, G_SHIFT, PER_CHANNEL, EVEN_K):
    """Loads of K step t; past the program's end (t >= t1) words and x are masked to 0 (a zero
    contribution) and scales / zeros read step t1 - 1 (in bounds)."""
    tc = tl.minimum(t, t1 - 1)
    widx = t * 16 + c
    if EVEN_K:
        words = tl.load(w_row + widx, mask=nmask & (t < t1), other=0)
    else:
        words = tl.load(w_row + widx, mask=nmask & (t < t1) & (widx < KWL), other=0)
    x0 = _x_pairs(x32, mx, t, c, K2, 0, t < t1, EVEN_K)
    x1 = _x_pairs(x32, mx, t, c, K2, 1, t < t1, EVEN_K)
    x2 = _x_pairs(x32, mx, t, c, K2, 2, t < t1, EVEN_K)
    x3 = _x_pairs(x32, mx, t, c, K2, 3, t < t1, EVEN_K)
    if G_SHIFT < 7 and not PER_CHANNEL:  # each lane's 32-column chunk in one group: [BN, 16], opaque
        gq = (tc * STEP + (c // 4) * 32) >> G_SHIFT  # [1, 16]
        # chunks past K in the last step: clamp to the last group (their words and x are 0, but a scale
        # read past the table could be inf / NaN, and 0 * inf is NaN)
        gq = tl.minimum(gq, ((2 * K2 + (1 << G_SHIFT) - 1) >> G_SHIFT) - 1)
        s = _ld16(s_ptr + gq * N + n, nmask)
        z = _ld16(z_ptr + gq * N + n, nmask)
    else:  # one scale per row for the step
        g = 0 if PER_CHANNEL else (tc * STEP) >> G_SHIFT
        s = tl.load(s_ptr + g * N + n, mask=nmask, other=0.0)
        z = tl.load(z_ptr + g * N + n, mask=nmask, other=0.0)
    return words, x0, x1, x2, x3, s, z


@triton.jit
def _mma_step(
    acc, cur, t, t1, x32, my, c, K2, ROWS16, HAS_ZERO, EVEN_K, BLOCK_N: tl.constexpr, ASM, CONS, BF16
):
    """acc += the lane fragments of step t (loads in ``cur``) through the decode + mma asm."""
    words, x0, x1, x2, x3, s, z = cur  # s, z fp16 (the asm converts them; BF16 only picks the asm)
    x0 = tl.broadcast_to(x0, [BLOCK_N, 16])
    x1 = tl.broadcast_to(x1, [BLOCK_N, 16])
    x2 = tl.broadcast_to(x2, [BLOCK_N, 16])
    x3 = tl.broadcast_to(x3, [BLOCK_N, 16])
    sb = tl.broadcast_to(s, [BLOCK_N, 16])
    zb = tl.broadcast_to(z, [BLOCK_N, 16])
    if ROWS16:
        y0 = _x_pairs(x32, my, t, c, K2, 0, t < t1, EVEN_K)
        y1 = _x_pairs(x32, my, t, c, K2, 1, t < t1, EVEN_K)
        y2 = _x_pairs(x32, my, t, c, K2, 2, t < t1, EVEN_K)
        y3 = _x_pairs(x32, my, t, c, K2, 3, t < t1, EVEN_K)
        if HAS_ZERO:
            ins = (acc, words, x0, x1, x2, x3, y0, y1, y2, y3, sb, zb)
        else:
            ins = (acc, words, x0, x1, x2, x3, y0, y1, y2, y3, sb)
    else:
        if HAS_ZERO:
            ins = (acc, words, x0, x1, x2, x3, sb, zb)
        else:
            ins = (acc, words, x0, x1, x2, x3, sb)
    return tl.inline_asm_elementwise(ASM, CONS, ins, dtype=tl.float32, is_pure=True, pack=8)


@triton.jit
def _w4_mma_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    M,
    N,
    K2,  # K / 2: pairs of x per row
    KWL,  # packed words per row
    STEPS,
    STEPS_PER_SPLIT,
    stride_x2,  # x row stride in pairs
    stride_wn,
    stride_ym,
    G_SHIFT: tl.constexpr,  # log2(group size) (ignored per channel)
    PER_CHANNEL: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ROWS16: tl.constexpr,  # M > 8: a second mma per step takes x rows 8..15
    ONE_ROW: tl.constexpr,  # M == 1
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ASM: tl.constexpr,
    CONS: tl.constexpr,
    TWO_STEPS: tl.constexpr,  # 0/1: two K steps per loop iteration (more loads in flight per warp)
    BF16: tl.constexpr,  # bf16 activations: bf16 decode + mma (fp16 otherwise)
    o_ptr,  # FIXUP: the [M, N] output (y_ptr is then the persistent fp32 workspace)
    cnt_ptr,  # FIXUP: int32 arrival counters, one per column block (persistent, left at 0)
    stride_om,
    FIXUP: tl.constexpr,  # split-K finished inside the kernel (no zero-fill / cast launches)
    PARTIALS: tl.constexpr,  # y_ptr is fp32 [SPLIT_K, M, N]: each split stores its own slice (no atomics)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if PARTIALS:
        y_ptr += pid_k * (M * stride_ym)
    r = tl.arange(0, BLOCK_N)[:, None]  # [BN, 1]
    c = tl.arange(0, 16)[None, :]  # [1, 16]
    n = pid_n * BLOCK_N + r
    nmask = n < N
    w_row = w_ptr + tl.multiple_of(n * stride_wn, [4, 4])
    x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    if ONE_ROW:  # one x row: load it once per lane ([1, 16]) and broadcast over the lane's rows
        mx = tl.zeros([1, 1], dtype=tl.int32)
    else:
        mx = tl.minimum(r % 8, M - 1) * stride_x2  # [BN, 1]: lane g supplies x row g (mma column g)
    my = tl.minimum(r % 8 + 8, M - 1) * stride_x2  # rows 8..15 (second mma)
    acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    t0 = pid_k * STEPS_PER_SPLIT
    t1 = tl.minimum(t0 + STEPS_PER_SPLIT, STEPS)
    cur = _load_step(
        x32, w_row, s_ptr, z_ptr, n, nmask, mx, c, t0, t1, N, K2, KWL, G_SHIFT, PER_CHANNEL, EVEN_K
    )
    if TWO_STEPS:  # two steps per iteration, both prefetched one iteration ahead
        cur2 = _load_step(
            x32, w_row, s_ptr, z_ptr, n, nmask, mx, c, t0 + 1, t1, N, K2, KWL, G_SHIFT, PER_CHANNEL, EVEN_K
        )
    for t in range(t0, t1, 1 + TWO_STEPS):
        # issue the loads of the next iteration's steps before the math of this one
        if TWO_STEPS:
            nxt = _load_step(
                x32, w_row, s_ptr, z_ptr, n, nmask, mx, c, t + 2, t1, N, K2, KWL, G_SHIFT, PER_CHANNEL, EVEN_K
            )
            nxt2 = _load_step(
                x32, w_row, s_ptr, z_ptr, n, nmask, mx, c, t + 3, t1, N, K2, KWL, G_SHIFT, PER_CHANNEL, EVEN_K
            )
            acc = _mma_step(
                acc, cur, t, t1, x32, my, c, K2, ROWS16, HAS_ZERO, EVEN_K, BLOCK_N, ASM, CONS, BF16
            )
            acc = _mma_step(
                acc, cur2, t + 1, t1, x32, my, c, K2, ROWS16, HAS_ZERO, EVEN_K, BLOCK_N, ASM, CONS, BF16
            )
            cur = nxt
            cur2 = nxt2
        else:
            nxt = _load_step(
                x32, w_row, s_ptr, z_ptr, n, nmask, mx, c, t + 1, t1, N, K2, KWL, G_SHIFT, PER_CHANNEL, EVEN_K
            )
            acc = _mma_step(
                acc, cur, t, t1, x32, my, c, K2, ROWS16, HAS_ZERO, EVEN_K, BLOCK_N, ASM, CONS, BF16
            )
            cur = nxt
    if ROWS16:  # acc[r, 4 q + i]: y[x row 2 q + i % 2 + 8 (i // 2), channel n(r)]
        ym = 2 * (c // 4) + (c % 2) + 8 * ((c % 4) // 2)  # [1, 16]
        out = acc
    else:  # elements 2, 3 of each lane's four hold the zero-point partials of elements 0, 1
        ym = 2 * (c // 4) + (c % 2)
        out = tl.inline_asm_elementwise(
            "add.f32 $0, $4, $6; add.f32 $1, $5, $7; mov.b32 $2, $6; mov.b32 $3, $7;",
            "=f,=f,=f,=f,f,f,f,f",
            (acc,),
            dtype=tl.float32,
            is_pure=True,
            pack=4,
        )
    ymask = (ym < M) & nmask
    if not ROWS16:
        ymask = ymask & ((c % 4) < 2)  # elements 2, 3 were folded into 0, 1
    if PARTIALS:
        _store(y_ptr + ym * stride_ym + n, out, ymask, 2)
    elif SPLIT_K == 1:
        _store(y_ptr + ym * stride_ym + n, out, ymask, 0)
    else:
        _store(y_ptr + ym * stride_ym + n, out, ymask, 1)
    if FIXUP:  # the last of the SPLIT_K programs of this column block casts, writes and re-zeroes
        tl.debug_barrier()  # every thread's red.add issued before the release below
        seen = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if seen == SPLIT_K - 1:
            finish_split(y_ptr, o_ptr, cnt_ptr, pid_n, M, N, stride_ym, stride_om, BLOCK_N)


@triton.jit
def finish_split(ws_ptr, o_ptr, cnt_ptr, pid_n, M, N, stride_wm, stride_om, BLOCK_N: tl.constexpr):
    """Read the column block's fp32 sums back from L2 (``.cg``), store them in the output dtype, zero
    the workspace and the counter for the next launch (stream order makes that safe)."""
    rows = tl.arange(0, 16)[:, None]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    m = (rows < M) & (cols < N)
    v = tl.load(ws_ptr + rows * stride_wm + cols, mask=m, other=0.0, cache_modifier=".cg")
    tl.store(o_ptr + rows * stride_om + cols, v.to(o_ptr.dtype.element_ty), mask=m)
    tl.store(ws_ptr + rows * stride_wm + cols, tl.zeros([16, BLOCK_N], tl.float32), mask=m)
    tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def _store(ptrs, val, mask, MODE: tl.constexpr):
    """Predicated store as inline PTX rather than ``tl.store``: MODE 0 casts to the output dtype (fp16 /
    bf16), 1 adds fp32 atomically (split-K into one buffer), 2 stores fp32 (split-K partials, one slice
    per split).

    A ``tl.store`` here is contiguous along rows, and Triton 3.6 then re-lays the whole loop out
    column-major to match it, which breaks the lane <-> mma-fragment map of the loads; an opaque
    store leaves the loads' row-major layout (the one the fragments need) in charge.
    """
    addr = ptrs.to(tl.uint64, bitcast=True)
    pred = mask.to(tl.int32)
    if MODE == 0:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p st.global.b16 [$1], $3; mov.b32 $0, 0; }",
            "=r,l,r,h",
            (addr, pred, val.to(ptrs.dtype.element_ty)),
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    elif MODE == 1:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p red.global.add.f32 [$1], $3; mov.b32 $0, 0; }",
            "=r,l,r,f",
            (addr, pred, val),
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p st.global.f32 [$1], $3; mov.b32 $0, 0; }",
            "=r,l,r,f",
            (addr, pred, val),
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


def mma_split(K: int, split_k: int) -> tuple[int, int]:
    """(programs along K, K steps per program) of a requested split-K; never an empty program."""
    steps = triton.cdiv(K, STEP_COLS)
    tps = triton.cdiv(steps, max(1, min(split_k, steps)))
    return triton.cdiv(steps, tps), tps


def launch_w4_mma(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    group_size: int,
    K: int,
    N: int,
    block_n: int,
    split_k: int,
    out: torch.Tensor | None,
    two_steps: int = 0,
    partials: bool = False,
) -> torch.Tensor:
    """Launch the W4 tensor-core GEMV (inputs already checked, ``mma_eligible`` true).

    x: fp16 or bf16 [M <= 16, K]; packed int32 [N, Kp / 8]; scales_t / zeros_t fp16 [n_groups, N] (zeros None:
    symmetric); block_n = 16 * warps (two rows per lane); split_k >= 1.  Returns y [M, N] in x.dtype, or
    with ``partials`` the fp32 [split, M, N] per-split sums (plain stores; the caller sums them, and
    ``out`` is then such a buffer).
    """
    M = x.shape[0]
    per_channel = group_size >= K
    steps = triton.cdiv(K, STEP_COLS)
    split, tps = mma_split(K, split_k)
    # in-kernel fix-up by default at split-K >= 8 only (H200: 14336x4096 split 8 17.8 vs 18.7 us;
    # 4096x14336 split 4 20.0 vs 16.0 us; int4 e2e with it at every split 343 vs 352 tokens/s);
    # WORKBENCH_W4_FIXUP=1: always
    fix = fixup_enabled(os.environ.get("WORKBENCH_W4_FIXUP") == "1" or split >= 8)
    ws = split_workspace(x, N, block_n) if split > 1 and fix and not partials else None
    if partials:
        y = alloc_partials("gemv_w4_mma", out, x, N, split)
    elif ws is not None:  # split-K finished in the kernel (checks.fixup_enabled)
        y = alloc_output("gemv_w4_mma", out, x, N, 1)
        ws, cnt = ws
    else:
        y = alloc_output("gemv_w4_mma", out, x, N, split)
    asm, cons = w4_asm(M > 8, zeros_t is not None, x.dtype == torch.bfloat16, exact_scheme(x, group_size, K))
    grid = (triton.cdiv(N, block_n), split)
    ck = _w4_mma_kernel[grid](
        x,
        packed,
        scales_t,
        zeros_t if zeros_t is not None else scales_t,
        y if ws is None else ws,
        M,
        N,
        K // 2,
        packed.shape[1],
        steps,
        tps,
        x.stride(0) // 2,
        packed.stride(0),
        y.stride(-2) if ws is None else ws.stride(0),
        G_SHIFT=0 if per_channel else group_size.bit_length() - 1,
        PER_CHANNEL=per_channel,
        HAS_ZERO=zeros_t is not None,
        ROWS16=M > 8,
        EVEN_K=K % STEP_COLS == 0,
        BLOCK_N=block_n,
        SPLIT_K=split,
        ASM=asm,
        CONS=cons,
        ONE_ROW=M == 1,
        TWO_STEPS=int(two_steps),
        BF16=x.dtype == torch.bfloat16,
        o_ptr=y,
        cnt_ptr=y if ws is None else cnt,
        stride_om=y.stride(-2),
        FIXUP=ws is not None,
        PARTIALS=partials,
        num_warps=block_n // 16,
    )
    _check_layout(ck)
    return y if partials else finish_output(y, out, x.dtype)


_LAYOUT_OK: set[int] = set()
_WANT = "sizePerThread = [1, 4], threadsPerWarp = [8, 4]"


def _check_layout(ck) -> None:
    """Refuse a compiled variant whose loads did not get the lane <-> fragment layout (once per variant)."""
    if ck is None or id(ck) in _LAYOUT_OK:
        return
    ir = ck.asm.get("ttgir", "")
    if ir and (_WANT not in ir.split("#blocked1")[0] or "convert_layout" in ir):
        raise WorkbenchError(
            f"gemv_w4_mma: Triton {triton.__version__} laid the weight tile out differently from the "
            f"mma fragments ({_WANT} expected); use gemv_int/gemm_int with an explicit config"
        )
    _LAYOUT_OK.add(id(ck))


def exact_scheme(x: torch.Tensor, group_size: int, K: int) -> bool:
    """Scale applied after the mma in fp32 (``w4_mma_asm``): bf16 always, fp16 with groups >= 128 or
    per channel (one scale per row and step) and <= 8 rows; otherwise fp16 rounds q s first."""
    if x.dtype == torch.bfloat16:
        return True
    return group_size >= min(K, STEP_COLS) and x.shape[0] <= 8  # 9-16 rows: 3.17 vs 3.61 SASS / weight


def mma_eligible(x: torch.Tensor, bits: int, group_size: int, K: int) -> bool:
    """The W4 tensor-core path applies to this x (``mma_applies``, and an even row stride, 4-byte aligned)."""
    if not mma_applies(x.shape[0], x.dtype, x.device, bits, group_size, K):
        return False
    return not (x.stride(0) % 2 or x.data_ptr() % 4)


def mma_applies(M: int, dtype: torch.dtype, device: torch.device, bits: int, group_size: int, K: int) -> bool:
    """The W4 tensor-core path applies to the problem: CUDA sm_80+, fp16 / bf16 x with <= 16 rows, even K,
    4-bit codes, group >= 32 (the launch checks already ensured a power of two) or per channel."""
    if os.environ.get("WORKBENCH_W4_MMA", "1") == "0":  # default on; WORKBENCH_W4_MMA=0 turns it off
        return False
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or bits != 4 or M > MAX_ROWS:
        return False
    if K % 2:
        return False
    dev = device.index
    if dev not in _CC:
        _CC[dev] = torch.cuda.get_device_capability(device)[0]
    if _CC[dev] < 8:
        return False
    if dtype == torch.bfloat16:  # bf16 needs the exact scheme: one scale per row and step
        return group_size >= min(K, STEP_COLS)
    return group_size >= K or group_size >= 32


_CC: dict[object, int] = {}
_SMS: dict[object, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessor count of the device (cached)."""
    if device.index not in _SMS:
        _SMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device.index]


# (block_n = 16 x warps, split_k, two_steps) tried by the tuner; split-K adds a memset and a cast kernel
SHAPE_CHOICES = [
    (64, 1, 0),
    (64, 1, 1),
    (128, 1, 0),
    (128, 1, 1),
    (64, 2, 0),
    (64, 2, 1),
    (128, 2, 1),
    (32, 4, 0),
    (64, 4, 0),
    (128, 4, 0),
    (64, 8, 0),
    (128, 8, 0),
    # more bytes in flight per warp with split-K, and a full wave at N = 4096 (ncu, fifth session)
    (32, 4, 1),
    (64, 4, 1),
    (32, 8, 0),
    (64, 8, 1),
    (32, 16, 0),
    (64, 16, 0),
]


def default_shape(N: int, K: int, sms: int, M: int = 1) -> tuple[int, int, int]:
    """(block_n, split_k, two_steps) when no tuned choice exists (or while a graph is captured).

    From the graph-timed tuner on the H200 (``benchmarks/RESULTS.md``, issue 13): the kernel is latency
    bound, and the winners keep ~24 warps per SM in flight at 1-8 rows (~12 at 9-16 rows, where each
    warp does twice the work): 4 warps per program, split-K doubled (<= 8, >= 4 steps per split) until
    the grid reaches that; two steps per iteration when each split walks more than 8 steps (measured on
    the H200, 2026-12-04: 14336x4096 split 8, 14 steps each: 15.5 us with two steps vs 17.9 without;
    4096x14336 split 4, 8 steps each: 17.1 vs 16.2).
    """
    block_n, steps = 64, triton.cdiv(K, STEP_COLS)
    want = (24 if M <= 8 else 12) * sms
    split = 1
    while (
        triton.cdiv(N, block_n) * split * (block_n // 16) < want and split < 8 and steps // (split * 2) >= 4
    ):
        split *= 2
    return block_n, split, int(steps > 8 * split)


def w4_mma(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    group_size: int,
    K: int,
    N: int,
    out: torch.Tensor | None = None,
    shape: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """W4 tensor-core GEMV; ``shape`` = (block_n, split_k, two_steps), default the heuristic one."""
    if shape is None:
        shape = default_shape(N, K, sm_count(x.device), x.shape[0])
    return launch_w4_mma(x, packed, scales_t, zeros_t, group_size, K, N, shape[0], shape[1], out, shape[2])


def choose_w4(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    group_size: int,
    K: int,
    N: int,
    other: list[tuple],
    run_other: Callable[..., object],
) -> tuple:
    """Per-GPU choice (``kernels.tune``) between this kernel's launch shapes, (0, block_n, split_k,
    two_steps), and the caller's own kernel's configs ``other``, (1, *config); returns the winner.
    ``run_other(config, out, packed, scales_t, zeros_t)`` launches the caller's kernel."""
    from workbench.kernels import tune

    M = x.shape[0]
    default = (0, *default_shape(N, K, sm_count(x.device), M))
    if not tune.tunable(x):
        return default
    steps = triton.cdiv(K, STEP_COLS)
    cands = [(0, *c) for c in SHAPE_CHOICES if c[1] == 1 or steps // c[1] >= 2] + [(1, *c) for c in other]

    def make_run() -> Callable[[tuple], object]:
        scratch = torch.empty(M, N, dtype=x.dtype, device=x.device)
        copies = tune.rotated_copies([packed, scales_t, zeros_t])
        turn = itertools.count()

        def run(c: tuple) -> object:  # each call takes the next weight copy (L2 cannot hold them all)
            p, s, z = copies[next(turn) % len(copies)]
            if c[0] == 0:
                return launch_w4_mma(x, p, s, z, group_size, K, N, c[1], c[2], scratch, c[3])
            return run_other(c[1:], scratch, p, s, z)

        return run

    key = tune.shape_key(x, N, K, 4, group_size, zeros_t is not None, False)
    return tune.pick("w4", key, x.device, cands, make_run, default)


def planned_w4(
    M: int, dtype: torch.dtype, device: torch.device, group_size: int, K: int, N: int, has_zero: bool
) -> tuple:
    """``choose_w4``'s answer without running a timing pass: this GPU's cached choice (shipped table or
    user cache), else the heuristic shape; for a launch decided before the op runs (split-K partials)."""
    from workbench.kernels import tune

    key = tune.problem_key(M, dtype, N, K, 4, group_size, has_zero, False)
    return tune.lookup("w4", key, device) or (0, *default_shape(N, K, sm_count(device), M))
