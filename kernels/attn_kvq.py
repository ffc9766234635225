"""Decode attention over a quantized KV cache, dequantized on the fly (one query token per sequence).

Layout (workbench/runtime/kvcache.py, `QuantKVSide`): per side, codes uint8 [B, Hkv, cap, D * bits / 8]
(element d of a token in byte d * bits // 8 at bit (d % (8 / bits)) * bits), fp16 scale and minimum
(`lo`, asymmetric; None when symmetric: codes offset by 2^(bits-1)), and a high-precision window
[B, Hkv, W, D] holding positions q .. n - 1 (q = the side's quantized prefix):

    keys per channel   scale / lo [B, Hkv, cap / G, D]   one per group of G tokens and channel
    values per token   scale / lo [B, Hkv, cap, D / G]   one per token and group of G channels

One program per (sequence, query head) walks the n positions in blocks of BLOCK_N tokens with an online
softmax (FlashDecoding-style, https://crfm.stanford.edu/2023/10/12/flashdecoding.html); each position's
key and value come from the codes (position < q) or the window. GQA: query head h reads kv head h // rep.
KIVI's layout: https://arxiv.org/abs/2402.02750. Reference twin: `reference.attn_kvq_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_side(
    codes_ptr, scale_ptr, lo_ptr, win_ptr, pos, d, mask_n, q_len, cap, W, stride_bh_win, bh,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, G: tl.constexpr, SYM: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """[BLOCK_N, D] float32 values of positions `pos` of one kv head `bh` (codes or window)."""
    in_q = (pos < q_len) & mask_n
    ROW: tl.constexpr = D * BITS // 8
    byte = tl.load(
        codes_ptr + bh * cap * ROW + pos[:, None] * ROW + (d[None, :] * BITS) // 8,
        mask=in_q[:, None],
        other=0,
    ).to(tl.int32)
    PER: tl.constexpr = 8 // BITS
    code = ((byte >> ((d[None, :] % PER) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    if PER_CHANNEL:
        s_off = bh * (cap // G) * D + (pos[:, None] // G) * D + d[None, :]
    else:
        s_off = bh * cap * (D // G) + pos[:, None] * (D // G) + d[None, :] // G
    scale = tl.load(scale_ptr + s_off, mask=in_q[:, None], other=0.0).to(tl.float32)
    if SYM:
        deq = (code - (1 << (BITS - 1))) * scale
    else:
        deq = code * scale + tl.load(lo_ptr + s_off, mask=in_q[:, None], other=0.0).to(tl.float32)
    in_w = (pos >= q_len) & mask_n
    w = tl.load(
        win_ptr + bh * stride_bh_win + (pos[:, None] - q_len) * D + d[None, :], mask=in_w[:, None], other=0.0
    ).to(tl.float32)
    return tl.where(in_q[:, None], deq, w)


@triton.jit
def _attn_kvq_kernel(
    q_ptr, out_ptr,
    kc, ks, kl, kw, vc, vs, vl, vw,
    n, qk, qv, cap, Wk, Wv, Hq, Hkv, sm_scale,
    K_BITS: tl.constexpr, K_CH: tl.constexpr, K_G: tl.constexpr, K_SYM: tl.constexpr,
    V_BITS: tl.constexpr, V_CH: tl.constexpr, V_G: tl.constexpr, V_SYM: tl.constexpr,
    D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # b * Hq + h
    b = pid // Hq
    h = pid % Hq
    bh = b * Hkv + h // (Hq // Hkv)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + pid * D + d).to(tl.float32)
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for start in range(0, n, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        mask_n = pos < n
        k = _load_side(kc, ks, kl, kw, pos, d, mask_n, qk, cap, Wk, Wk * D, bh, K_BITS, K_CH, K_G, K_SYM, D)
        s = tl.sum(k * q[None, :], 1) * sm_scale
        s = tl.where(mask_n, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = _load_side(vc, vs, vl, vw, pos, d, mask_n, qv, cap, Wv, Wv * D, bh, V_BITS, V_CH, V_G, V_SYM, D)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    tl.store(out_ptr + pid * D + d, acc / l_i)


def attn_kvq(q: torch.Tensor, k: dict, v: dict, n: int, sm_scale: float, block_n: int = 64) -> torch.Tensor:
    """Decode attention of q [B, Hq, D] over n cached positions; returns float32 [B, Hq, D].

    k / v: {"codes", "scale", "lo" (None: symmetric), "window" [B, Hkv, W, D], "q" (quantized prefix),
    "bits" (2, 4, 8), "per_channel" (bool), "group" (G)} as `QuantKVSide.kernel_args()` gives them.
    """
    B, Hq, D = q.shape
    Hkv, cap = k["codes"].shape[1], k["codes"].shape[2]
    if D & (D - 1) or Hq % Hkv:
        raise ValueError(
            f"attn_kvq: head dim {D} must be a power of two and {Hq} query heads a multiple of {Hkv}"
        )
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)

    def win(side):
        w = side["window"]
        return (w if w is not None and w.shape[2] else q.new_zeros(B, Hkv, 1, D)).contiguous()

    kw, vw = win(k), win(v)
    _attn_kvq_kernel[(B * Hq,)](
        q.contiguous(), out,
        k["codes"], k["scale"], k["lo"] if k["lo"] is not None else k["scale"], kw,
        v["codes"], v["scale"], v["lo"] if v["lo"] is not None else v["scale"], vw,
        n, k["q"], v["q"], cap, kw.shape[2], vw.shape[2], Hq, Hkv, sm_scale,
        k["bits"], k["per_channel"], k["group"], k["lo"] is None,
        v["bits"], v["per_channel"], v["group"], v["lo"] is None,
        D, block_n,
    )  # fmt: skip
    return out
