"""One decode step's write into the static quantized KV cache, fused into one launch per side.

`kv_store(ring, codes, scale, lo, x, pos, R, bits, per_channel, G)` does what `StaticKVSide.write_ref`
(workbench/runtime/kvstatic.py, the torch twin with the same arguments) does in ~30 small torch kernels:
put the new token x [H, D] into ring slot pos % W, then quantize the token (per token) or the aligned group
of G tokens (per channel) holding position max(pos - R, 0) and store its packed codes and fp16 scale /
minimum. Grid: one program per kv head. The arithmetic is `int_params` / `int_codes` bit for bit: fp16
rounding of the minimum and of the scale, IEEE division (`div_rn`), round half to even (`_rint`).

Layouts (`QuantKVSide`, B = 1): ring [1, H, W, D]; codes uint8 [1, H, cap, D * bits / 8]; scale / lo fp16
[1, H, cap, D / G] (per token) or [1, H, cap / G, D] (per channel); pos int64 [1] on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS = tl.constexpr(2.0**-24)  # workbench.quant.kvcache._EPS: the smallest fp16 subnormal


@triton.jit
def _pack(code, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """int32 codes [ROWS, D] -> bytes [ROWS, D * BITS / 8]: element d at bit (d % (8 / BITS)) * BITS."""
    if BITS == 8:
        return code
    elif BITS == 4:
        c0, c1 = tl.split(code.reshape(ROWS, D // 2, 2))
        return c0 | (c1 << 4)
    else:
        a, b = tl.split(code.reshape(ROWS, D // 4, 2, 2))  # a: elements 4i + 2j, b: 4i + 2j + 1
        a0, a1 = tl.split(a)
        b0, b1 = tl.split(b)
        return a0 | (b0 << 2) | (a1 << 4) | (b1 << 6)


@triton.jit
def _rint(y):
    """Round half to even (torch.round) of float32 y, |y| < 2^22: floor(y + 0.5), ties moved to even."""
    r = tl.floor(y + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - y) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _quant(x, BITS: tl.constexpr, SYM: tl.constexpr, AXIS: tl.constexpr):
    """(codes int32, scale, lo) of x [.., G] rows reduced over AXIS, as `int_params` / `int_codes`."""
    if SYM:
        amax = tl.max(tl.abs(x), axis=AXIS, keep_dims=True)
        scale = tl.math.div_rn(amax, tl.full(amax.shape, 2 ** (BITS - 1) - 1, tl.float32))
        scale = tl.maximum(scale, EPS).to(tl.float16).to(tl.float32)
        half: tl.constexpr = 2 ** (BITS - 1)
        q = _rint(tl.math.div_rn(x, tl.broadcast_to(scale, x.shape)))
        code = tl.minimum(tl.maximum(q, -half), half - 1) + half
        lo = scale
    else:
        lo = tl.min(x, axis=AXIS, keep_dims=True).to(tl.float16).to(tl.float32)
        hi = tl.max(x, axis=AXIS, keep_dims=True)
        scale = tl.math.div_rn(hi - lo, tl.full(lo.shape, 2**BITS - 1, tl.float32))
        scale = tl.maximum(scale, EPS).to(tl.float16).to(tl.float32)
        q = _rint(tl.math.div_rn(x - lo, tl.broadcast_to(scale, x.shape)))
        code = tl.minimum(tl.maximum(q, 0.0), 2**BITS - 1)
    return code.to(tl.int32), scale, lo


@triton.jit
def _kv_store_kernel(
    ring_ptr, codes_ptr, scale_ptr, lo_ptr, x_ptr, pos_ptr, R, W, cap,
    BITS: tl.constexpr, CH: tl.constexpr, G: tl.constexpr, SYM: tl.constexpr, D: tl.constexpr,
    SPAN: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    pos = tl.load(pos_ptr)  # int64
    d = tl.arange(0, D)
    x = tl.load(x_ptr + h * D + d)
    ring_h = ring_ptr + h.to(tl.int64) * W * D
    tl.store(ring_h + (pos % W) * D + d, x.to(ring_ptr.dtype.element_ty))
    first = tl.maximum(pos - R, 0) // SPAN * SPAN
    p = first + tl.arange(0, SPAN)  # [SPAN] positions quantized now
    rows = tl.load(ring_h + (p % W)[:, None] * D + d[None, :]).to(tl.float32)  # [SPAN, D]
    xr = x.to(ring_ptr.dtype.element_ty).to(tl.float32)
    rows = tl.where((p == pos)[:, None], tl.broadcast_to(xr[None, :], (SPAN, D)), rows)
    ROW: tl.constexpr = D * BITS // 8
    if CH:  # one group of SPAN = G tokens, a scale per channel
        code, scale, lo = _quant(rows, BITS, SYM, 0)  # scale / lo [1, D]
        s_off = h.to(tl.int64) * (cap // G) * D + (first // G) * D + d[None, :]
    else:  # one token, a scale per group of G channels
        code, scale, lo = _quant(rows.reshape(D // G, G), BITS, SYM, 1)  # scale / lo [D / G, 1]
        code = code.reshape(1, D)
        s_off = h.to(tl.int64) * cap * (D // G) + first * (D // G) + tl.arange(0, D // G)[:, None]
    tl.store(scale_ptr + s_off, scale.to(tl.float16))
    if not SYM:
        tl.store(lo_ptr + s_off, lo.to(tl.float16))
    packed = _pack(code, SPAN, D, BITS)  # [SPAN, ROW]
    j = tl.arange(0, ROW)
    c_off = h.to(tl.int64) * cap * ROW + p[:, None] * ROW + j[None, :]
    tl.store(codes_ptr + c_off, packed.to(tl.uint8))


def kv_store(ring, codes, scale, lo, x, pos, R: int, bits: int, per_channel: bool, G: int) -> None:
    """The fused per-step write (module docstring); x [H, D] is the new token (any float dtype)."""
    H, D = x.shape
    W, cap = ring.shape[2], codes.shape[2]
    span = G if per_channel else 1
    _kv_store_kernel[(H,)](
        ring, codes, scale, lo if lo is not None else scale, x.contiguous(), pos, R, W, cap,
        BITS=bits, CH=per_channel, G=G, SYM=lo is None, D=D, SPAN=span, num_warps=1 if D <= 64 else 4,
    )  # fmt: skip


def kernel_reason(x: torch.Tensor, bits: int, G: int) -> str | None:
    """Why `kv_store` cannot take this side (the torch twin runs), or None."""
    D = x.shape[-1]
    if D & (D - 1) or G & (G - 1):
        return f"head dim {D} / group {G} not powers of two"
    if bits not in (2, 4, 8):
        return f"{bits}-bit codes"
    return None
