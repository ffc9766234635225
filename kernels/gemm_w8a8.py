"""W8A8: int8 activations x int8 weights (int32 accumulation) and FP8 E4M3 x FP8 E4M3, scales per row/channel.

Both paths quantize the input dynamically per token (one scale per row of x, from that row alone, as the
plan's `int8_tok_sym` / `fp8_e4m3_tok` activation specs simulate, quant/act.py) and keep the weight as
8-bit values with one fp32 scale per output channel (`int8_ch_sym`, `fp8_e4m3` weight specs):

    int8   x_q = clamp(round(x / s_x), -128, 127),  s_x = absmax(x_row) * clip / 127      x_q int8 [M, K]
           y   = (x_q @ w_q^T) * s_x[:, None] * s_w[None, :]   with x_q @ w_q^T exact in int32
    fp8    x_q = e4m3(clamp(x / s_x, ±448)),         s_x = absmax(x_row) * clip / 448     x_q e4m3 [M, K]
           y   = (x_q @ w_q^T) * s_x[:, None] * s_w[None, :]   (torch._scaled_mm, row-wise scales)

The int8 product runs either on our Triton kernel below (`tl.dot` on int8 tensor cores, int32 accumulator,
the two scales applied in the epilogue; any M, masked edges) or on cuBLASLt through `torch._int_mm`, which
needs M > 16 and K, N multiples of 8. `w8a8_int8` runs the Triton kernel unless asked for `_int_mm` (ours
was faster at every measured shape, its epilogue fused). At one row the Triton kernel quantizes x itself
(`gemm_w8a8_fused`: each program takes the row's absmax, then quantizes every K tile it feeds to
`tl.dot`: one launch in all); elsewhere the codes come from the one-launch row quantizer of
kernels/quant_rows.py, then the GEMM (two launches; fusing at 2-16 rows would make every one of the
N / BLOCK_N programs quantize all 16 padded rows again). Both give codes bit-identical to the torch
`quantize_rows_int8` / `quantize_rows_fp8` here and to the plan's simulation. FP8 quantizes with the row
quantizer, then runs `torch._scaled_mm` (cuBLASLt, compute capability >= 8.9), which needs K and N
multiples of 16 and writes bf16 (fp16 inputs get a bf16 product cast to fp16).

SmoothQuant (https://arxiv.org/abs/2211.10438) and QuaRot (https://arxiv.org/abs/2404.00456) run their W8A8
matmuls this way. Torch twins: `reference.w8a8_int8_ref`, `reference.w8a8_fp8_ref` (same signatures).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from workbench.kernels.checks import check_activation
from workbench.kernels.quant_rows import int8_codes, quantize_rows_triton, row_scale

from workbench.errors import WorkbenchError

FP8_MAX = 448.0
FUSED_MAX_ROWS = 1  # w8a8_int8 quantizes inside the GEMM (gemm_w8a8_fused) up to this many rows
INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA: "self.size(0) needs to be greater than 16"


# ---------------------------------------------------------------------------------------------- activations
def quantize_rows_int8(x: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of x [M, K] -> (x_q int8 [M, K], s_x fp32 [M]) (module docstring)."""
    xf = x.float()
    s = (xf.abs().amax(-1) * clip / 127.0).clamp_min(1e-12)  # [M]
    return torch.clamp(torch.round(xf / s[:, None]), -128, 127).to(torch.int8), s


def quantize_rows_fp8(x: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 E4M3 of x [M, K] -> (x_q float8_e4m3fn [M, K], s_x fp32 [M]) (module docstring)."""
    xf = x.float()
    s = (xf.abs().amax(-1) * clip / FP8_MAX).clamp_min(1e-12)  # [M]
    return (xf / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def quantize_rows(x: torch.Tensor, fmt: str, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row codes and scales of x [M, K] ("int8" or "fp8"): the one-launch Triton quantizer where Triton
    runs (CUDA, or the interpreter), else the torch functions above; both give identical bits."""
    if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return quantize_rows_triton(x, fmt, clip)
    return quantize_rows_int8(x, clip) if fmt == "int8" else quantize_rows_fp8(x, clip)


# ---------------------------------------------------------------------------------------------- Triton kernel
@triton.jit
def _gemm_w8a8_kernel(
    # pointers
    a_ptr,  # int8 [M, K] quantized activations
    b_ptr,  # int8 [N, K] weights
    sa_ptr,  # fp32 [M]
    sb_ptr,  # fp32 [N]
    y_ptr,  # [M, N] fp16 / bf16
    # sizes
    M,
    N,
    K,
    # strides (elements)
    stride_am,
    stride_bn,
    stride_ym,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(
            a_ptr + rm[:, None] * stride_am + kk[None, :],
            mask=(rm[:, None] < M) & (kk[None, :] < K),
            other=0,
        )  # [BM, BK] int8
        b = tl.load(
            b_ptr + rn[None, :] * stride_bn + kk[:, None],
            mask=(rn[None, :] < N) & (kk[:, None] < K),
            other=0,
        )  # [BK, BN] int8 (the weight read transposed)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)  # [BM]
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)  # [BN]
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


@triton.jit
def _gemm_w8a8_fused_kernel(
    x_ptr,  # [M, K] fp16 / bf16 activations (quantized here, per row)
    b_ptr,  # int8 [N, K] weights
    sb_ptr,  # fp32 [N]
    y_ptr,  # [M, N] fp16 / bf16
    M,
    N,
    K,
    stride_xm,
    stride_bn,
    stride_ym,
    clip,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_ROW: tl.constexpr,
    XBLOCK: tl.constexpr,
):
    """The int8 GEMM with the per-token quantizer as its prologue: each program reads its BLOCK_M rows of x
    once for their absmax (quant_rows.row_scale), then quantizes every x tile it feeds to `tl.dot`.

    ONE_ROW (M == 1, decode): only the one real row is quantized, as a [BLOCK_K] vector placed in row 0 of
    the [BLOCK_M, BLOCK_K] tile (`tl.dot` needs 16 rows); the general path would quantize 16 rows (15 of
    them padding) in every one of the N / BLOCK_N programs."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    if ONE_ROW:
        rx = tl.arange(0, XBLOCK)
        amax_v = tl.zeros((XBLOCK,), dtype=tl.float32)
        for k0 in range(0, K, XBLOCK):
            xv = tl.load(x_ptr + k0 + rx, mask=k0 + rx < K, other=0.0)  # [XBLOCK]
            amax_v = tl.maximum(amax_v, tl.abs(xv.to(tl.float32)))
        s_row = row_scale(tl.max(amax_v, 0), clip, 127.0)  # scalar
        sa = tl.where(rm == 0, s_row, 0.0)  # [BM]
    else:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + kk[None, :],
                mask=(rm[:, None] < M) & (kk[None, :] < K),
                other=0.0,
            )  # [BM, BK]
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 1))
        sa = row_scale(amax, clip, 127.0)  # [BM]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if ONE_ROW:
            xv = tl.load(x_ptr + kk, mask=kk < K, other=0.0)  # [BK]
            qv = int8_codes(tl.math.div_rn(xv.to(tl.float32), s_row))  # [BK]
            a = tl.where(rm[:, None] == 0, qv[None, :], 0.0).to(tl.int8)  # [BM, BK], row 0 real
        else:
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + kk[None, :],
                mask=(rm[:, None] < M) & (kk[None, :] < K),
                other=0.0,
            )  # [BM, BK]
            a = int8_codes(tl.math.div_rn(x.to(tl.float32), sa[:, None])).to(tl.int8)
        b = tl.load(
            b_ptr + rn[None, :] * stride_bn + kk[:, None],
            mask=(rn[None, :] < N) & (kk[:, None] < K),
            other=0,
        )  # [BK, BN] int8 (the weight read transposed)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)  # [BN]
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


@dataclass(frozen=True)
class W8A8Config:
    """Launch shape of `_gemm_w8a8_kernel` (BLOCK_M >= 16: `tl.dot`'s smallest tile)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3


def default_w8a8_config(M: int) -> W8A8Config:
    """Decode rows: thin M tiles, narrow N tiles so the grid covers the SMs; more rows: 128 x 128 tiles."""
    if M <= 16:
        return W8A8Config(16, 32, 256, 4, 4)
    if M <= 64:
        return W8A8Config(64, 64, 128, 4, 3)
    return W8A8Config(128, 128, 64, 8, 3)


def _check_w8(name: str, x_q: torch.Tensor, s_x: torch.Tensor, w_q: torch.Tensor, s_w: torch.Tensor, dtype):
    """Shapes and dtypes of a W8A8 call; returns (M, N, K)."""
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.shape[1] != w_q.shape[1]:
        raise WorkbenchError(
            f"{name}: x_q must be [M, K] and w_q [N, K] with the same K, got {tuple(x_q.shape)} and "
            f"{tuple(w_q.shape)}"
        )
    if x_q.dtype != w_q.dtype:
        raise WorkbenchError(f"{name}: x_q is {x_q.dtype} but w_q is {w_q.dtype}")
    M, K = x_q.shape
    N = w_q.shape[0]
    if s_x.shape != (M,) or s_w.shape != (N,) or s_x.dtype != torch.float32 or s_w.dtype != torch.float32:
        raise WorkbenchError(
            f"{name}: scales must be float32 [M={M}] and [N={N}], got {s_x.dtype} {tuple(s_x.shape)} and "
            f"{s_w.dtype} {tuple(s_w.shape)}"
        )
    if not (x_q.stride(1) == 1 and w_q.is_contiguous()):
        raise WorkbenchError(f"{name}: x_q must be contiguous along K and w_q contiguous")
    if dtype not in (torch.float16, torch.bfloat16):
        raise WorkbenchError(f"{name}: output dtype must be float16 or bfloat16, got {dtype}")
    return M, N, K


def gemm_w8a8_triton(
    x_q: torch.Tensor,
    s_x: torch.Tensor,
    w_q: torch.Tensor,
    s_w: torch.Tensor,
    out_dtype: torch.dtype,
    config: W8A8Config | None = None,
) -> torch.Tensor:
    """y [M, N] = (x_q @ w_q^T) * s_x[:, None] * s_w[None, :] on the Triton int8 kernel.

    Args:
        x_q: int8 [M, K]; s_x: fp32 [M]; w_q: int8 [N, K] contiguous; s_w: fp32 [N].
        out_dtype: float16 or bfloat16; config: launch shape (default `default_w8a8_config(M)`).
    Returns:
        y: [M, N] in out_dtype.
    """
    M, N, K = _check_w8("gemm_w8a8_triton", x_q, s_x, w_q, s_w, out_dtype)
    if x_q.dtype != torch.int8:
        raise WorkbenchError(f"gemm_w8a8_triton: x_q and w_q must be int8, got {x_q.dtype}")
    cfg = config or default_w8a8_config(M)
    y = torch.empty(M, N, dtype=out_dtype, device=x_q.device)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n))
    _gemm_w8a8_kernel[grid](
        x_q, w_q, s_x, s_w, y, M, N, K, x_q.stride(0), w_q.stride(0), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def gemm_w8a8_fused(
    x: torch.Tensor, w_q: torch.Tensor, s_w: torch.Tensor, clip: float = 1.0, config: W8A8Config | None = None
) -> torch.Tensor:
    """y [M, N] = int8(x) @ w_q^T * s_x * s_w in one launch (the quantizer fused into the GEMM's prologue).

    Every program re-reads its rows of x (a few KB from L2) and quantizes them again, so this is for decode
    rows (`w8a8_int8` uses it at M <= FUSED_MAX_ROWS); any M is computed correctly. The codes and scales
    are bit-identical to `quantize_rows_int8` / `quantize_rows_triton`.

    Args:
        x: fp16/bf16 [M, K]; w_q: int8 [N, K] contiguous; s_w: fp32 [N]; clip: in (0, 1].
        config: launch shape (default `default_w8a8_config(M)`).
    Returns:
        y: [M, N] in x.dtype.
    """
    check_activation(x, w_q.shape[1], "gemm_w8a8_fused")
    if w_q.dtype != torch.int8 or not w_q.is_contiguous():
        raise WorkbenchError(f"gemm_w8a8_fused: w_q must be contiguous int8, got {w_q.dtype}")
    M, K = x.shape
    N = w_q.shape[0]
    if s_w.shape != (N,) or s_w.dtype != torch.float32:
        raise WorkbenchError(
            f"gemm_w8a8_fused: s_w must be float32 [N={N}], got {s_w.dtype} {tuple(s_w.shape)}"
        )
    cfg = config or default_w8a8_config(M)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n))
    _gemm_w8a8_fused_kernel[grid](
        x, w_q, s_w, y, M, N, K, x.stride(0), w_q.stride(0), y.stride(0), float(clip),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        ONE_ROW=M == 1, XBLOCK=min(4096, triton.next_power_of_2(K)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def gemm_w8a8_int_mm(
    x_q: torch.Tensor, s_x: torch.Tensor, w_q: torch.Tensor, s_w: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """The same product on cuBLASLt (`torch._int_mm`: M > 16, K and N multiples of 8), then the scales."""
    M, N, K = _check_w8("gemm_w8a8_int_mm", x_q, s_x, w_q, s_w, out_dtype)
    if x_q.is_cuda and (M < INT_MM_MIN_ROWS or K % 8 or N % 8):
        raise WorkbenchError(f"gemm_w8a8_int_mm: torch._int_mm needs M > 16, K and N % 8 == 0; got {M, N, K}")
    acc = torch._int_mm(x_q, w_q.t())  # [M, N] int32
    return (acc.float() * s_x[:, None] * s_w[None, :]).to(out_dtype)


def int_mm_eligible(M: int, N: int, K: int) -> bool:
    """Whether torch._int_mm can run an [M, K] x [N, K] product (`w8a8_int8(..., use_int_mm=True)`)."""
    return M >= INT_MM_MIN_ROWS and K % 8 == 0 and N % 8 == 0


def w8a8_int8(
    x: torch.Tensor, w_q: torch.Tensor, s_w: torch.Tensor, clip: float = 1.0, use_int_mm: bool | None = None
) -> torch.Tensor:
    """y [M, N] = int8(x) @ w_q^T with per-token and per-channel scales, in x.dtype.

    Args:
        x: fp16/bf16 [M, K]; w_q: int8 [N, K]; s_w: fp32 [N]; clip: activation clip ratio in (0, 1].
        use_int_mm: True runs torch._int_mm (M > 16, K and N % 8 == 0); False or None (default) the Triton
            kernel, which on the H200 beat _int_mm plus its torch epilogue at 2,048 rows on all four
            Llama-3-8B shapes (e.g. 74 vs 172 µs at 4096 x 4096; benchmarks/RESULTS.md, issue 16).
    """
    check_activation(x, w_q.shape[1], "w8a8_int8")
    M, K = x.shape
    if use_int_mm:
        x_q, s_x = quantize_rows(x, "int8", clip)
        return gemm_w8a8_int_mm(x_q, s_x, w_q, s_w, x.dtype)
    if M <= FUSED_MAX_ROWS:
        return gemm_w8a8_fused(x, w_q, s_w, clip)
    x_q, s_x = quantize_rows(x, "int8", clip)
    return gemm_w8a8_triton(x_q, s_x, w_q, s_w, x.dtype)


def fp8_mm_reason(N: int, K: int, device: torch.device | None = None) -> str | None:
    """Why torch._scaled_mm cannot run an FP8 [N, K] weight here, or None."""
    if K % 16 or N % 16:
        return f"torch._scaled_mm needs K and N multiples of 16, got K={K}, N={N}"
    if device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return f"FP8 matmul needs compute capability >= 8.9, got {torch.cuda.get_device_capability(device)}"
    return None


def w8a8_fp8(x: torch.Tensor, w_q: torch.Tensor, s_w: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """y [M, N] = e4m3(x) @ w_q^T with per-token and per-channel scales (torch._scaled_mm), in x.dtype.

    Args:
        x: fp16/bf16 [M, K]; w_q: float8_e4m3fn [N, K] contiguous; s_w: fp32 [N]; clip: in (0, 1].
    """
    check_activation(x, w_q.shape[1], "w8a8_fp8")
    x_q, s_x = quantize_rows(x, "fp8", clip)
    M, N, K = _check_w8("w8a8_fp8", x_q, s_x, w_q, s_w, x.dtype)
    reason = fp8_mm_reason(N, K, x.device)
    if reason:
        raise WorkbenchError(f"w8a8_fp8: {reason}")
    y = torch._scaled_mm(
        x_q, w_q.t(), scale_a=s_x[:, None], scale_b=s_w[None, :], out_dtype=torch.bfloat16
    )  # [M, N]
    return y.to(x.dtype)
