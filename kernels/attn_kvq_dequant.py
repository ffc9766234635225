"""The dequantizing split-K kernel of the quantized-KV decode attention (`impl="dequant"`).

Each program dequantizes every position's key and value to float32 (whole code bytes loaded and unpacked in
registers with `tl.join`, or the window) and feeds float32 tiles to `tl.dot`. The older of the two kernels,
kept as a second implementation the bit-plane kernel (kernels/attn_kvq_planes.py) is tested against. Layout,
grid and workspace: kernels/attn_kvq.py.
"""

from __future__ import annotations

import triton
import triton.language as tl
from workbench.kernels.attn_kvq_common import head_base, quantized_prefix_len, win_slot


@triton.jit
def _unpack(byte, BITS: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr):
    """Codes [BLOCK_N, D_P] of bytes [BLOCK_N, D_P * BITS / 8]: element d at bit (d % (8 / BITS)) * BITS."""
    if BITS == 8:
        return byte
    elif BITS == 4:
        return tl.join(byte & 15, byte >> 4).reshape(BLOCK_N, D_P)
    else:  # int2: join((c0, c2), (c1, c3)) flattens to c0, c1, c2, c3
        c0, c1, c2, c3 = byte & 3, (byte >> 2) & 3, (byte >> 4) & 3, (byte >> 6) & 3
        return tl.join(tl.join(c0, c2), tl.join(c1, c3)).reshape(BLOCK_N, D_P)


@triton.jit
def _deq_codes(
    codes_ptr, scale_ptr, lo_ptr, pos, d, mask_n, q_len, cap, bh,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, G: tl.constexpr, SYM: tl.constexpr, D: tl.constexpr,
    D_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """[BLOCK_N, D_P] float32 dequantized codes of positions `pos` (< q_len) of kv head `bh`; 0 elsewhere.

    Codes are read as whole bytes (vector loads) and unpacked in registers; per-token scales are read once
    per group of G channels and broadcast when G is a power of two (else one load per element).
    """
    in_q = (pos < q_len) & mask_n
    m_q = in_q[:, None] & (d[None, :] < D)
    ROW: tl.constexpr = D * BITS // 8
    ROW_P: tl.constexpr = D_P * BITS // 8
    j = tl.arange(0, ROW_P)
    byte = tl.load(
        codes_ptr + head_base(bh, cap * ROW) + pos[:, None] * ROW + j[None, :],
        mask=in_q[:, None] & (j[None, :] < ROW),
        other=0,
    ).to(tl.int32)
    code = _unpack(byte, BITS, BLOCK_N, D_P).to(tl.float32)
    if PER_CHANNEL:
        s_off = head_base(bh, (cap // G) * D) + (pos[:, None] // G) * D + d[None, :]
        scale = tl.load(scale_ptr + s_off, mask=m_q, other=0.0).to(tl.float32)
        if not SYM:
            lo = tl.load(lo_ptr + s_off, mask=m_q, other=0.0).to(tl.float32)
    elif (G & (G - 1)) == 0 and G <= D_P:
        NG: tl.constexpr = D_P // G
        gi = tl.arange(0, NG)
        g_off = head_base(bh, cap * (D // G)) + pos[:, None] * (D // G) + gi[None, :]
        g_mask = in_q[:, None] & (gi[None, :] < D // G)
        scale = tl.load(scale_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
        scale = tl.broadcast_to(scale[:, :, None], (BLOCK_N, NG, G)).reshape(BLOCK_N, D_P)
        if not SYM:
            lo = tl.load(lo_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
            lo = tl.broadcast_to(lo[:, :, None], (BLOCK_N, NG, G)).reshape(BLOCK_N, D_P)
    else:
        s_off = head_base(bh, cap * (D // G)) + pos[:, None] * (D // G) + d[None, :] // G
        scale = tl.load(scale_ptr + s_off, mask=m_q, other=0.0).to(tl.float32)
        if not SYM:
            lo = tl.load(lo_ptr + s_off, mask=m_q, other=0.0).to(tl.float32)
    if SYM:
        deq = (code - (1 << (BITS - 1))) * scale
    else:
        deq = code * scale + lo
    return deq


@triton.jit
def _load_side(
    codes_ptr, scale_ptr, lo_ptr, win_ptr, start, d, mask_n, q_len, cap, W, stride_bh_win, bh,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, G: tl.constexpr, SYM: tl.constexpr, D: tl.constexpr,
    D_P: tl.constexpr, BLOCK_N: tl.constexpr, RING: tl.constexpr,
):  # fmt: skip
    """[BLOCK_N, D_P] float32 values of positions start + [0, BLOCK_N) of kv head `bh` (codes or window).

    A block wholly in the quantized prefix reads only codes, one wholly past it only the window. The
    window holds positions q_len .. n - 1 from its slot 0 (RING False, `QuantKVSide`) or position p in slot
    p % W (RING True, the static store of `workbench.runtime.kvstatic`).
    """
    pos = start + tl.arange(0, BLOCK_N)
    if start + BLOCK_N <= q_len:
        x = _deq_codes(
            codes_ptr,
            scale_ptr,
            lo_ptr,
            pos,
            d,
            mask_n,
            q_len,
            cap,
            bh,
            BITS,
            PER_CHANNEL,
            G,
            SYM,
            D,
            D_P,
            BLOCK_N,
        )
    else:
        in_w = (pos >= q_len) & mask_n
        x = tl.load(
            win_ptr + head_base(bh, stride_bh_win) + win_slot(pos, q_len, W, RING)[:, None] * D + d[None, :],
            mask=in_w[:, None] & (d[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        if start < q_len:
            deq = _deq_codes(
                codes_ptr,
                scale_ptr,
                lo_ptr,
                pos,
                d,
                mask_n,
                q_len,
                cap,
                bh,
                BITS,
                PER_CHANNEL,
                G,
                SYM,
                D,
                D_P,
                BLOCK_N,
            )
            x = tl.where((pos < q_len)[:, None], deq, x)
    return x


@triton.jit
def attn_kvq_dequant_kernel(
    q_ptr, m_ptr, l_ptr, acc_ptr,
    kc, ks, kl, kw, vc, vs, vl, vw,
    n, qk, qv, cap, Wk, Wv, Hq, Hkv, sm_scale, chunk, n_splits, len_ptr, Rk, Rv,
    K_BITS: tl.constexpr, K_CH: tl.constexpr, K_G: tl.constexpr, K_SYM: tl.constexpr,
    V_BITS: tl.constexpr, V_CH: tl.constexpr, V_G: tl.constexpr, V_SYM: tl.constexpr,
    D: tl.constexpr, D_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    DEV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One (kv head, split): all rep query heads of the kv head over positions [split * chunk, +chunk).

    Writes the split's unnormalised partial: row max m, sum l [BLOCK_H] and acc [BLOCK_H, D] (float32).
    DEV: n is read from len_ptr (int64 [1], CUDA-graph safe), the quantized prefixes follow from it and the
    residual windows Rk / Rv (`KVSpec.quantized_prefix`), the windows are rings; splits past n store nothing.
    """
    if DEV:
        n = tl.load(len_ptr).to(tl.int32)
        qk = quantized_prefix_len(n, Rk, K_CH, K_G)
        qv = quantized_prefix_len(n, Rv, V_CH, V_G)
    bh = tl.program_id(0)  # b * Hkv + kv head
    sp = tl.program_id(1)
    rep = Hq // Hkv
    b = bh // Hkv
    r = tl.arange(0, BLOCK_H)
    d = tl.arange(0, D_P)  # D padded to >= 16 for tl.dot
    mask_h = r < rep
    q_rows = b * Hq + (bh % Hkv) * rep + r  # query heads h = kv head * rep + r
    q = tl.load(
        q_ptr + q_rows[:, None] * D + d[None, :], mask=mask_h[:, None] & (d[None, :] < D), other=0.0
    ).to(tl.float32)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, D_P), tl.float32)
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, n)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        mask_n = pos < hi
        k = _load_side(
            kc,
            ks,
            kl,
            kw,
            start,
            d,
            mask_n,
            qk,
            cap,
            Wk,
            Wk * D,
            bh,
            K_BITS,
            K_CH,
            K_G,
            K_SYM,
            D,
            D_P,
            BLOCK_N,
            DEV,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = _load_side(
            vc,
            vs,
            vl,
            vw,
            start,
            d,
            mask_n,
            qv,
            cap,
            Wv,
            Wv * D,
            bh,
            V_BITS,
            V_CH,
            V_G,
            V_SYM,
            D,
            D_P,
            BLOCK_N,
            DEV,
        )
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    row = (bh * n_splits + sp) * BLOCK_H + r
    tl.store(m_ptr + row, m_i)
    tl.store(l_ptr + row, l_i)
    tl.store(acc_ptr + row[:, None] * D_P + d[None, :], acc)
