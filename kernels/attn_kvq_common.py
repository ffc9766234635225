"""Triton helpers shared by the quantized-KV decode attention kernels (kernels/attn_kvq.py): 64-bit head
offsets, the window slot of a position, the quantized prefix of a side, and the split combine kernel."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def head_base(bh, per_head):
    """int64 offset of kv head `bh`'s first element: B * Hkv * cap * row overflows int32 (B 64, 32k, int8)."""
    return bh.to(tl.int64) * per_head


@triton.jit
def win_slot(pos, q_len, W, RING: tl.constexpr):
    """Window slot of positions pos >= q_len: pos - q_len (a linear window) or pos % W (a ring)."""
    if RING:
        return pos % W
    return pos - q_len


@triton.jit
def quantized_prefix_len(n, R, PER_CHANNEL: tl.constexpr, G: tl.constexpr):
    """`KVSpec.quantized_prefix(n)`: max(n - R, 0), rounded down to whole groups of G tokens per channel."""
    m = tl.maximum(n - R, 0)
    if PER_CHANNEL:
        m = m // G * G
    return m


@triton.jit
def attn_kvq_combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, Hq, Hkv, n_splits,
    D: tl.constexpr, D_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One query head: log-sum-exp combine of its n_splits partials into out [D] (float32)."""
    pid = tl.program_id(0)  # b * Hq + h
    rep = Hq // Hkv
    h = pid % Hq
    bh = (pid // Hq) * Hkv + h // rep
    d = tl.arange(0, D_P)
    m_run = tl.full((), float("-inf"), tl.float32)
    l_run = tl.zeros((), tl.float32)
    acc = tl.zeros((D_P,), tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        ok = sp < n_splits
        row = (bh * n_splits + sp) * BLOCK_H + h % rep
        m = tl.load(m_ptr + row, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(m, 0))
        w = tl.where(ok, tl.exp(m - m_new), 0.0)
        alpha = tl.exp(m_run - m_new)
        part = tl.load(acc_ptr + row[:, None] * D_P + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * part, 0)
        l_run = l_run * alpha + tl.sum(w * tl.load(l_ptr + row, mask=ok, other=0.0), 0)
        m_run = m_new
    tl.store(out_ptr + pid * D + d, acc / l_run, mask=d < D)
