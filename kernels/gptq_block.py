"""GPTQ's sequential column loop over one lazy-update block in one Triton launch.

GPTQ (https://arxiv.org/abs/2210.17323, reference code IST-DASLab/gptq) quantizes the columns of one block
of B columns one after the other; each column's error is spread over the block's later columns through
the block's slice of the upper Cholesky factor of H^-1. In torch that is ~10 kernel launches per column
(K launches x 10 for a layer: the 70B-shaped GPTQ spent most of its time launching them). Rows are
independent, so here one program holds BLOCK_N rows x B columns of the block in registers and runs the
whole column loop on them:

    for i in 0..B-1:   w = W1[:, i]; s = S1[:, i]; z = Z1[:, i]; d = Hinv1[i, i]
                       q = clamp(rne(w / s) + z, 0, maxq)            -> codes[:, i]
                       e = (w - (q - z) * s) / d                     -> Err1[:, i]
                       W1[:, i:] -= e * Hinv1[i, i:]

exactly `quant/gptq.py`'s loop (scales and zeros of the block's columns given, S1 / Z1 [N, B], possibly
expanded views). Divisions are IEEE (`tl.math.div_rn`), rounding is half to even (the 1.5 * 2^23 trick,
exact for |v| < 2^22, as quant_rows.py). Under TRITON_INTERPRET=1 the result equals the torch twin
`gptq_block_ref` bit for bit; compiled, the GPU may contract a multiply and a subtraction into one FMA,
so a code can move by one where w / s sits on a rounding boundary (tests/test_gptq_kernel.py bounds it).
W1 is read, not written: GPTQ discards the block's updated weights; the caller applies Err1 to the
columns after the block with one GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 256  # columns per launch held in registers (GPTQ's block is 128; groups of 256 take 256)


@triton.jit
def _round_even(v):
    """Round float32 v to the nearest integer, ties to even (exact for |v| < 2^22)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _gptq_block_kernel(
    w_ptr,
    h_ptr,
    s_ptr,
    z_ptr,
    c_ptr,
    e_ptr,
    N,
    B,
    stride_wn,
    stride_wk,
    stride_hr,
    stride_hc,
    stride_sn,
    stride_sk,
    stride_zn,
    stride_zk,
    stride_cn,
    stride_ck,
    stride_en,
    stride_ek,
    maxq,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_B)
    rmask = rows < N
    cmask = cols < B
    m2 = rmask[:, None] & cmask[None, :]
    W = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=m2, other=0.0)
    for i in range(0, B):
        sel = cols[None, :] == i
        w = tl.sum(tl.where(sel, W, 0.0), axis=1)
        s = tl.load(s_ptr + rows * stride_sn + i * stride_sk, mask=rmask, other=1.0)
        z = tl.load(z_ptr + rows * stride_zn + i * stride_zk, mask=rmask, other=0.0)
        d = tl.load(h_ptr + i * stride_hr + i * stride_hc)
        h = tl.load(h_ptr + i * stride_hr + cols * stride_hc, mask=cmask & (cols >= i), other=0.0)
        q = tl.minimum(tl.maximum(_round_even(tl.math.div_rn(w, s)) + z, 0.0), maxq)
        e = tl.math.div_rn(w - (q - z) * s, d)
        W = W - e[:, None] * h[None, :]
        tl.store(c_ptr + rows * stride_cn + i * stride_ck, q.to(tl.uint8), mask=rmask)
        tl.store(e_ptr + rows * stride_en + i * stride_ek, e, mask=rmask)


def _block_n(B: int) -> int:
    """Rows per program: ~4096 fp32 values of the block tile per program (32 per thread at 4 warps)."""
    return max(8, 4096 // triton.next_power_of_2(B))


def gptq_block(
    W1: torch.Tensor, Hinv1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor, maxq: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop over one block (module docstring) in one launch.

    Args:
        W1: [N, B] float32 weights of the block's columns (updated by the earlier blocks; any strides).
        Hinv1: [B, B] float32 the block's slice of the upper Cholesky factor of H^-1.
        S1, Z1: [N, B] float32 scale and zero point of each weight (expanded views are fine).
        maxq: 2^bits - 1.
    Returns:
        codes uint8 [N, B], Err1 float32 [N, B] (the scaled errors the caller spreads over later columns).
    """
    N, B = W1.shape
    assert 0 < B <= MAX_BLOCK, f"gptq_block: {B} columns, at most {MAX_BLOCK}"
    assert Hinv1.shape == (B, B) and S1.shape == (N, B) and Z1.shape == (N, B), "gptq_block: shape mismatch"
    assert W1.dtype == Hinv1.dtype == S1.dtype == Z1.dtype == torch.float32, "gptq_block: float32 inputs"
    codes = torch.empty(N, B, dtype=torch.uint8, device=W1.device)
    err = torch.empty(N, B, dtype=torch.float32, device=W1.device)
    BN = _block_n(B)
    _gptq_block_kernel[(triton.cdiv(N, BN),)](
        W1, Hinv1, S1, Z1, codes, err, N, B,
        *W1.stride(), *Hinv1.stride(), *S1.stride(), *Z1.stride(), *codes.stride(), *err.stride(),
        float(maxq), BLOCK_N=BN, BLOCK_B=triton.next_power_of_2(B), num_warps=4,
    )  # fmt: skip
    return codes, err
