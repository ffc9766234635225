"""Per-token activation quantization in one Triton launch: int8 symmetric and FP8 E4M3 codes + fp32 scales.

For every row of x [M, K] (fp16/bf16) one program computes, exactly as the plan's `int8_tok_sym` /
`fp8_e4m3_tok` simulation does (quant/act.py, float32 math):

    s   = max(absmax(x_row) * clip / Q, 1e-12)          Q = 127 (int8) or 448 (E4M3)
    int8: q = clamp(rne(x / s), -128, 127)               E4M3: q = rne_e4m3(clamp(x / s, -448, 448))

and writes q ([M, K], int8 or float8_e4m3fn) and s ([M], fp32). The torch version (`quantize_rows_int8`,
`quantize_rows_fp8` in gemm_w8a8.py) takes ~5 launches; this is one (the W8A8 decode paths were dominated
by it: ~18 µs of the ~26 µs int8 call at one row on an H200, benchmarks/RESULTS.md issue 16).

Rounding is done in float32 arithmetic so that the compiled kernel and the interpreter give the same bits as
torch: the division is IEEE (`tl.math.div_rn`; Triton's `/` is approximate on fp32), round-half-to-even
is the 1.5 * 2^23 magic-number trick (exact for |v| < 2^22), and the E4M3 rounding is that trick at the
value's own quantum 2^(e - 3) (e = its binade exponent, at least -6 for the subnormals), so the final cast
to float8 sees an exactly representable value. Ties therefore go to even like `torch.round` and like
torch's `.to(torch.float8_e4m3fn)`.

SmoothQuant (https://arxiv.org/abs/2211.10438) quantizes activations per token this way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from workbench.kernels.checks import check_activation

from workbench.errors import WorkbenchError

INT8_MAX = 127.0
FP8_MAX = 448.0
SCALE_EPS = 1e-12  # quant/act.py's _EPS
ROW_BLOCK = 16384  # rows up to this long are read once (in registers); longer ones in two passes


@triton.jit
def _rne(v):
    """Round float32 v to the nearest integer, ties to even (exact for |v| < 2^22)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def int8_codes(v):
    """v = x / s (float32) -> clamp(rne(v), -128, 127) as float32 (integral values)."""
    return _rne(tl.minimum(tl.maximum(v, -128.0), 127.0))


@triton.jit
def e4m3_values(v):
    """v = x / s (float32) -> the E4M3 value nearest to clamp(v, ±448), ties to even, as float32.

    The quantum of |v| in [2^e, 2^(e+1)) is 2^(e - 3) (3 mantissa bits), 2^-9 below 2^-6 (subnormals).
    """
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127  # binade exponent of |v|
    e = tl.maximum(e, -6) - 3
    quantum = ((e + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e), exact
    r = _rne(tl.abs(v) * inv) * quantum
    # the sign of v copied as a bit, -0.0 included (torch keeps E4M3's negative zero): Triton lowers `-r` to
    # `0 - r`, which gives +0.0 for r = 0 on the GPU (seen on the H200, 2026-12-02)
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def row_scale(amax, clip, QMAX: tl.constexpr):
    """max(amax * clip / QMAX, 1e-12) in float32 with an IEEE division (quant/act.py's scale)."""
    return tl.maximum(tl.math.div_rn(amax * clip, QMAX), 1e-12)


@triton.jit
def _quant_rows_kernel(
    x_ptr,  # [M, K] fp16 / bf16
    q_ptr,  # [M, K] int8 / float8_e4m3fn
    s_ptr,  # [M] fp32
    K,
    stride_xm,
    stride_qm,
    clip,
    FP8: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    QMAX: tl.constexpr = 448.0 if FP8 else 127.0
    if BLOCK >= K:  # the whole row in registers: one read
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        s = row_scale(tl.max(tl.abs(x), 0), clip, QMAX)
        v = tl.math.div_rn(x, s)
        q = e4m3_values(v) if FP8 else int8_codes(v)
        tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
    else:  # longer rows: one pass for the absmax, one for the codes
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        s = row_scale(tl.max(amax, 0), clip, QMAX)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            v = tl.math.div_rn(x, s)
            q = e4m3_values(v) if FP8 else int8_codes(v)
            tl.store(q_row + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=k0 + offs < K)
    tl.store(s_ptr + row, s)


def quantize_rows_triton(x: torch.Tensor, fmt: str, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes of x [M, K] fp16/bf16 in one launch -> (q [M, K] int8 or float8_e4m3fn, s fp32 [M]).

    Args:
        x: [M, K], unit stride along K; fmt: "int8" or "fp8"; clip: activation clip ratio in (0, 1].
    """
    check_activation(x, x.shape[-1] if x.dim() == 2 else -1, "quantize_rows_triton")
    if fmt not in ("int8", "fp8"):
        raise WorkbenchError(f"quantize_rows_triton: fmt must be 'int8' or 'fp8', got {fmt!r}")
    if not 0.0 < clip <= 1.0:
        raise WorkbenchError(f"quantize_rows_triton: clip must be in (0, 1], got {clip}")
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.int8 if fmt == "int8" else torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    block = min(ROW_BLOCK, triton.next_power_of_2(K))
    _quant_rows_kernel[(M,)](
        x, q, s, K, x.stride(0), q.stride(0), float(clip),
        FP8=fmt == "fp8", BLOCK=block, num_warps=max(1, min(16, block // 512)),
    )  # fmt: skip
    return q, s
