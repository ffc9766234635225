"""Decode attention over a quantized KV cache, dequantized on the fly (one query token per sequence).

Layout (workbench/runtime/kvcache.py, `QuantKVSide`): per side, codes uint8 [B, Hkv, cap, D * bits / 8]
(element d of a token in byte d * bits // 8 at bit (d % (8 / bits)) * bits), fp16 scale and minimum
(`lo`, asymmetric; None when symmetric: codes offset by 2^(bits-1)), and a high-precision window
[B, Hkv, W, D] holding positions q .. n - 1 (q = the side's quantized prefix):

    keys per channel   scale / lo [B, Hkv, cap / G, D]   one per group of G tokens and channel
    values per token   scale / lo [B, Hkv, cap, D / G]   one per token and group of G channels

Split-K flash-decoding (https://crfm.stanford.edu/2023/10/12/flashdecoding.html): the grid is
(B * Hkv, n_splits); a program takes one kv head and a contiguous chunk of the n positions, and serves all
rep = Hq / Hkv query heads of that kv head at once (a q tile [rep padded to 16, D] for `tl.dot`, tf32x3:
float32-accurate), so each cache byte is read once per step. It walks its chunk in blocks of BLOCK_N tokens
with an online softmax, dequantizing each position's key and value from the codes (position < q: whole
bytes loaded, unpacked in registers) or the window, and writes its partial (row max, sum, accumulator) to a
float32 workspace; a second kernel reduces the splits of each query head by log-sum-exp. n_splits comes from
the SM count (about 4 programs per SM) and n. Head dims below 16 are zero-padded to 16.
KIVI's layout: https://arxiv.org/abs/2402.02750. Reference twin: `reference.attn_kvq_ref`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


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
def _base(bh, per_head):
    """int64 offset of kv head `bh`'s first element: B * Hkv * cap * row overflows int32 (B 64, 32k, int8)."""
    return bh.to(tl.int64) * per_head


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
        codes_ptr + _base(bh, cap * ROW) + pos[:, None] * ROW + j[None, :],
        mask=in_q[:, None] & (j[None, :] < ROW),
        other=0,
    ).to(tl.int32)
    code = _unpack(byte, BITS, BLOCK_N, D_P).to(tl.float32)
    if PER_CHANNEL:
        s_off = _base(bh, (cap // G) * D) + (pos[:, None] // G) * D + d[None, :]
        scale = tl.load(scale_ptr + s_off, mask=m_q, other=0.0).to(tl.float32)
        if not SYM:
            lo = tl.load(lo_ptr + s_off, mask=m_q, other=0.0).to(tl.float32)
    elif (G & (G - 1)) == 0 and G <= D_P:
        NG: tl.constexpr = D_P // G
        gi = tl.arange(0, NG)
        g_off = _base(bh, cap * (D // G)) + pos[:, None] * (D // G) + gi[None, :]
        g_mask = in_q[:, None] & (gi[None, :] < D // G)
        scale = tl.load(scale_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
        scale = tl.broadcast_to(scale[:, :, None], (BLOCK_N, NG, G)).reshape(BLOCK_N, D_P)
        if not SYM:
            lo = tl.load(lo_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)
            lo = tl.broadcast_to(lo[:, :, None], (BLOCK_N, NG, G)).reshape(BLOCK_N, D_P)
    else:
        s_off = _base(bh, cap * (D // G)) + pos[:, None] * (D // G) + d[None, :] // G
        scale = tl.load(scale_ptr + s_off, mask=m_q, other=0.0).to(tl.float32)
        if not SYM:
            lo = tl.load(lo_ptr + s_off, mask=m_q, other=0.0).to(tl.float32)
    if SYM:
        deq = (code - (1 << (BITS - 1))) * scale
    else:
        deq = code * scale + lo
    return deq


@triton.jit
def _win_slot(pos, q_len, W, RING: tl.constexpr):
    """Window slot of positions pos >= q_len: pos - q_len (a linear window) or pos % W (a ring)."""
    if RING:
        return pos % W
    return pos - q_len


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
            win_ptr + _base(bh, stride_bh_win) + _win_slot(pos, q_len, W, RING)[:, None] * D + d[None, :],
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
def _dot_codes(a, code, PREC: tl.constexpr):
    """a (float32) @ code (small unsigned integer codes, exact in tf32) with float32 accumulation.

    "tf32x3": a = hi + rest with hi a's top 10 mantissa bits, two tf32 passes; only rest's rounding (~2^-21
    relative) is lost. "tf32": one pass (10-bit mantissas). (A split into two fp16 halves against fp16 codes
    measured no faster on the H200, 2026-12-03: benchmarks/bench_kv_step_h200_planes_sweep2.json.)
    """
    if PREC == "tf32x3":
        b = code.to(tl.float32)
        hi = (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        x = tl.dot(hi, b, input_precision="tf32") + tl.dot(a - hi, b, input_precision="tf32")
    else:
        x = tl.dot(a, code.to(tl.float32), input_precision=PREC)
    return x


@triton.jit
def _prefix(n, R, PER_CHANNEL: tl.constexpr, G: tl.constexpr):
    """`KVSpec.quantized_prefix(n)`: max(n - R, 0), rounded down to whole groups of G tokens per channel."""
    m = tl.maximum(n - R, 0)
    if PER_CHANNEL:
        m = m // G * G
    return m


@triton.jit
def _attn_kvq_split_kernel(
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
        qk = _prefix(n, Rk, K_CH, K_G)
        qv = _prefix(n, Rv, V_CH, V_G)
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


@triton.jit
def _pick(e: tl.constexpr, a0, a1, a2, a3):
    """The e-th of four values (e a constexpr: resolved at compile time)."""
    if e == 0:
        x = a0
    elif e == 1:
        x = a1
    elif e == 2:
        x = a2
    else:
        x = a3
    return x


@triton.jit
def _plane(byte, e: tl.constexpr, BITS: tl.constexpr):
    """Integer codes of bit plane e of bytes [BLOCK_N, DJ] (uint8): channel j * (8 / BITS) + e of byte j."""
    if BITS == 8:
        x = byte
    else:
        x = (byte >> (e * BITS)) & ((1 << BITS) - 1)
    return x


@triton.jit
def _bytes(codes_ptr, pos, j, ok, cap, bh, DJ: tl.constexpr, DJ_P: tl.constexpr, ALL: tl.constexpr):
    """uint8 code bytes [BLOCK_N, DJ_P] of positions `pos` (rows of DJ bytes); 0 where not `ok` [BLOCK_N].

    ALL: every position is valid (`ok` unused), so a row of DJ = DJ_P bytes loads without a mask.
    (No code may follow a return under a constexpr `if` here: Triton's code generator still compiles it.)
    """
    ptr = codes_ptr + _base(bh, cap * DJ) + pos[:, None] * DJ + j[None, :]
    if ALL and DJ == DJ_P:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=ok[:, None] & (j[None, :] < DJ), other=0)
    return x


@triton.jit
def _deq_plane(
    code, scale_ptr, lo_ptr, pos, j, m, cap, bh, e: tl.constexpr, BITS: tl.constexpr,
    PER_CHANNEL: tl.constexpr, G: tl.constexpr, SYM: tl.constexpr, D: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    """Plane e's codes [BLOCK_N, DJ_P] dequantized with their own scale (and minimum); 0 where not m."""
    code = code.to(tl.float32)
    c = j * NP + e  # the channel of each plane column
    if PER_CHANNEL:
        off = _base(bh, (cap // G) * D) + (pos[:, None] // G) * D + c[None, :]
    else:
        off = _base(bh, cap * (D // G)) + pos[:, None] * (D // G) + c[None, :] // G
    scale = tl.load(scale_ptr + off, mask=m, other=0.0).to(tl.float32)
    if SYM:
        x = (code - (1 << (BITS - 1))) * scale
    else:
        x = code * scale + tl.load(lo_ptr + off, mask=m, other=0.0).to(tl.float32)
    return x


@triton.jit
def _mixed_plane(
    byte, scale_ptr, lo_ptr, win_ptr, pos, j, mask_n, q_len, cap, W, bh, e: tl.constexpr, BITS: tl.constexpr,
    PER_CHANNEL: tl.constexpr, G: tl.constexpr, SYM: tl.constexpr, D: tl.constexpr, NP: tl.constexpr,
    DJ: tl.constexpr, RING: tl.constexpr,
):  # fmt: skip
    """Plane e [BLOCK_N, DJ_P] of any block: dequantized codes below q_len, the window from q_len on."""
    in_q = (pos < q_len) & mask_n
    mj = j[None, :] < DJ
    x = _deq_plane(
        _plane(byte, e, BITS),
        scale_ptr,
        lo_ptr,
        pos,
        j,
        in_q[:, None] & mj,
        cap,
        bh,
        e,
        BITS,
        PER_CHANNEL,
        G,
        SYM,
        D,
        NP,
    )
    in_w = (pos >= q_len) & mask_n
    w_off = _base(bh, W * D) + _win_slot(pos, q_len, W, RING)[:, None] * D + (j * NP + e)[None, :]
    w = tl.load(win_ptr + w_off, mask=in_w[:, None] & mj, other=0.0).to(tl.float32)
    return tl.where(in_q[:, None], x, w)


@triton.jit
def _scores_codes(
    q0, q1, q2, q3, byte, ks, kl, pos, start, j, cap, bh, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    G: tl.constexpr, SYM: tl.constexpr, D: tl.constexpr, NP: tl.constexpr, DJ: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """q . keys of a whole-code block at `start` -> [BLOCK_H, BLOCK_N], q given as its NP channel planes.

    Per-channel keys with the block inside one group of G tokens: the block's scale goes onto q,
    (q * scale) . code + q . lo (or - 2^(b-1) * sum(q * scale)), the codes meeting the MMA exactly; other
    layouts dequantize each element.
    """
    mj = j < DJ
    if PER_CHANNEL and G % BLOCK_N == 0:
        s_off = _base(bh, (cap // G) * D) + (start // G) * D
        s = tl.zeros((q0.shape[0], BLOCK_N), tl.float32)
        bias = tl.zeros((q0.shape[0],), tl.float32)
        for e in tl.static_range(NP):
            qe = _pick(e, q0, q1, q2, q3)
            qs = qe * tl.load(ks + s_off + j * NP + e, mask=mj, other=0.0).to(tl.float32)[None, :]
            s += _dot_codes(qs, tl.trans(_plane(byte, e, BITS)), PREC)
            if SYM:
                bias -= (1 << (BITS - 1)) * tl.sum(qs, 1)
            else:
                bias += tl.sum(
                    qe * tl.load(kl + s_off + j * NP + e, mask=mj, other=0.0).to(tl.float32)[None, :], 1
                )
        s += bias[:, None]
    else:
        m = (pos >= 0)[:, None] & mj[None, :]
        s = tl.zeros((q0.shape[0], BLOCK_N), tl.float32)
        for e in tl.static_range(NP):
            k = _deq_plane(
                _plane(byte, e, BITS), ks, kl, pos, j, m, cap, bh, e, BITS, PER_CHANNEL, G, SYM, D, NP
            )
            s += tl.dot(_pick(e, q0, q1, q2, q3), tl.trans(k), input_precision=PREC)
    return s


@triton.jit
def _pv_codes(
    p, byte, vs, vl, pos, j, cap, bh, e: tl.constexpr, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    G: tl.constexpr, SYM: tl.constexpr, D: tl.constexpr, NP: tl.constexpr, DJ: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """p [BLOCK_H, BLOCK_N] @ plane e of a whole-code value block -> [BLOCK_H, DJ_P].

    Per-token values with one scale per token (G = D): the scale goes onto p, (p * scale) @ code + p . lo
    (or - 2^(b-1) * sum(p * scale)); other layouts dequantize each element.
    """
    if (not PER_CHANNEL) and G == D:
        ps = p * tl.load(vs + _base(bh, cap) + pos).to(tl.float32)[None, :]
        pv = _dot_codes(ps, _plane(byte, e, BITS), PREC)
        if SYM:
            pv -= (1 << (BITS - 1)) * tl.sum(ps, 1)[:, None]
        else:
            pv += tl.sum(p * tl.load(vl + _base(bh, cap) + pos).to(tl.float32)[None, :], 1)[:, None]
    else:
        m = (pos >= 0)[:, None] & (j[None, :] < DJ)
        v = _deq_plane(_plane(byte, e, BITS), vs, vl, pos, j, m, cap, bh, e, BITS, PER_CHANNEL, G, SYM, D, NP)
        pv = tl.dot(p, v, input_precision=PREC)
    return pv


@triton.jit
def _pv_mixed(
    p, byte, vs, vl, vw, pos, j, mask_n, q_len, cap, W, bh, e: tl.constexpr, BITS: tl.constexpr,
    PER_CHANNEL: tl.constexpr, G: tl.constexpr, SYM: tl.constexpr, D: tl.constexpr, NP: tl.constexpr,
    DJ: tl.constexpr, RING: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """p [BLOCK_H, BLOCK_N] @ plane e of any value block (`_mixed_plane`) -> [BLOCK_H, DJ_P]."""
    v = _mixed_plane(byte, vs, vl, vw, pos, j, mask_n, q_len, cap, W, bh, e, BITS, PER_CHANNEL, G, SYM, D,
                     NP, DJ, RING)  # fmt: skip
    return tl.dot(p, v, input_precision=PREC)


@triton.jit
def _online(s, m_i, l_i):
    """Online-softmax step of scores s [BLOCK_H, BLOCK_N]: (new max, p, rescale of the old sums, new sum)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    return m_new, p, alpha, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attn_kvq_planes_kernel(
    q_ptr, m_ptr, l_ptr, acc_ptr,
    kc, ks, kl, kw, vc, vs, vl, vw,
    n, qk, qv, cap, Wk, Wv, Hq, Hkv, sm_scale, chunk, n_splits, len_ptr, Rk, Rv,
    K_BITS: tl.constexpr, K_CH: tl.constexpr, K_G: tl.constexpr, K_SYM: tl.constexpr,
    V_BITS: tl.constexpr, V_CH: tl.constexpr, V_G: tl.constexpr, V_SYM: tl.constexpr,
    D: tl.constexpr, D_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    DEV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """`_attn_kvq_split_kernel`'s job with the codes in bit planes: no unpacking join, no branch per block.

    A byte row of b-bit codes holds NP = 8 / b channels per byte: plane e is channel j * NP + e of byte j. The
    query is loaded as the key side's NP planes and the accumulator kept as the value side's NP planes
    (stored interleaved back to channel order), so the codes go to `tl.dot` straight from a shift and a mask.
    Blocks wholly below both quantized prefixes run a branch-free loop (the scales onto q and p where the
    layout allows, `_scores_codes` / `_pv_codes`); the rest of the split (the block holding a prefix
    boundary, the window) runs a masked loop that mixes codes and window (`_mixed_plane`).
    """
    NPK: tl.constexpr = 8 // K_BITS
    NPV: tl.constexpr = 8 // V_BITS
    DJK: tl.constexpr = D // NPK  # bytes per key row = channels per plane
    DJV: tl.constexpr = D // NPV
    DJK_P: tl.constexpr = DJK if DJK >= 16 else 16  # tl.dot wants >= 16 along K and N
    DJV_P: tl.constexpr = DJV if DJV >= 16 else 16
    if DEV:
        n = tl.load(len_ptr).to(tl.int32)
        qk = _prefix(n, Rk, K_CH, K_G)
        qv = _prefix(n, Rv, V_CH, V_G)
    bh = tl.program_id(0)  # b * Hkv + kv head
    sp = tl.program_id(1)
    rep = Hq // Hkv
    r = tl.arange(0, BLOCK_H)
    jk = tl.arange(0, DJK_P)
    jv = tl.arange(0, DJV_P)
    mask_h = r < rep
    q_rows = (bh // Hkv) * Hq + (bh % Hkv) * rep + r  # query heads h = kv head * rep + r
    q_base = q_ptr + q_rows[:, None] * D
    q_m = mask_h[:, None] & (jk[None, :] < DJK)
    q0 = tl.load(q_base + (jk * NPK)[None, :], mask=q_m, other=0.0).to(tl.float32)
    q1, q2, q3 = q0, q0, q0
    if NPK > 1:
        q1 = tl.load(q_base + (jk * NPK + 1)[None, :], mask=q_m, other=0.0).to(tl.float32)
    if NPK > 2:
        q2 = tl.load(q_base + (jk * NPK + 2)[None, :], mask=q_m, other=0.0).to(tl.float32)
        q3 = tl.load(q_base + (jk * NPK + 3)[None, :], mask=q_m, other=0.0).to(tl.float32)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc0 = tl.zeros((BLOCK_H, DJV_P), tl.float32)
    acc1 = tl.zeros((BLOCK_H, DJV_P), tl.float32)
    acc2 = tl.zeros((BLOCK_H, DJV_P), tl.float32)
    acc3 = tl.zeros((BLOCK_H, DJV_P), tl.float32)
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, n)
    mid = tl.maximum(tl.minimum(hi, tl.minimum(qk, qv) // BLOCK_N * BLOCK_N), lo)
    for start in range(lo, mid, BLOCK_N):  # whole-code blocks: no mask on positions, no branch
        pos = start + tl.arange(0, BLOCK_N)
        kb = _bytes(kc, pos, jk, pos >= 0, cap, bh, DJK, DJK_P, True)
        vb = _bytes(vc, pos, jv, pos >= 0, cap, bh, DJV, DJV_P, True)  # both loads in flight at once
        s = _scores_codes(
            q0,
            q1,
            q2,
            q3,
            kb,
            ks,
            kl,
            pos,
            start,
            jk,
            cap,
            bh,
            K_BITS,
            K_CH,
            K_G,
            K_SYM,
            D,
            NPK,
            DJK,
            BLOCK_N,
            PREC,
        )
        m_i, p, alpha, l_i = _online(s * sm_scale, m_i, l_i)
        acc0 = acc0 * alpha[:, None] + _pv_codes(
            p, vb, vs, vl, pos, jv, cap, bh, 0, V_BITS, V_CH, V_G, V_SYM, D, NPV, DJV, PREC
        )
        if NPV > 1:
            acc1 = acc1 * alpha[:, None] + _pv_codes(
                p, vb, vs, vl, pos, jv, cap, bh, 1, V_BITS, V_CH, V_G, V_SYM, D, NPV, DJV, PREC
            )
        if NPV > 2:
            acc2 = acc2 * alpha[:, None] + _pv_codes(
                p, vb, vs, vl, pos, jv, cap, bh, 2, V_BITS, V_CH, V_G, V_SYM, D, NPV, DJV, PREC
            )
            acc3 = acc3 * alpha[:, None] + _pv_codes(
                p, vb, vs, vl, pos, jv, cap, bh, 3, V_BITS, V_CH, V_G, V_SYM, D, NPV, DJV, PREC
            )
    for start in range(mid, hi, BLOCK_N):  # the rest: a prefix boundary, the window, the split's end
        pos = start + tl.arange(0, BLOCK_N)
        mask_n = pos < hi
        kb = _bytes(kc, pos, jk, (pos < qk) & mask_n, cap, bh, DJK, DJK_P, False)
        s = tl.zeros((BLOCK_H, BLOCK_N), tl.float32)
        for e in tl.static_range(NPK):
            k = _mixed_plane(kb, ks, kl, kw, pos, jk, mask_n, qk, cap, Wk, bh, e, K_BITS, K_CH, K_G, K_SYM, D,
                             NPK, DJK, DEV)  # fmt: skip
            s += tl.dot(_pick(e, q0, q1, q2, q3), tl.trans(k), input_precision=PREC)
        s = tl.where(mask_n[None, :], s * sm_scale, float("-inf"))
        m_i, p, alpha, l_i = _online(s, m_i, l_i)
        vb = _bytes(vc, pos, jv, (pos < qv) & mask_n, cap, bh, DJV, DJV_P, False)
        pv = _pv_mixed(p, vb, vs, vl, vw, pos, jv, mask_n, qv, cap, Wv, bh, 0, V_BITS, V_CH, V_G, V_SYM, D,
                       NPV, DJV, DEV, PREC)  # fmt: skip
        acc0 = acc0 * alpha[:, None] + pv
        if NPV > 1:
            pv = _pv_mixed(p, vb, vs, vl, vw, pos, jv, mask_n, qv, cap, Wv, bh, 1, V_BITS, V_CH, V_G, V_SYM,
                           D, NPV, DJV, DEV, PREC)  # fmt: skip
            acc1 = acc1 * alpha[:, None] + pv
        if NPV > 2:
            pv = _pv_mixed(p, vb, vs, vl, vw, pos, jv, mask_n, qv, cap, Wv, bh, 2, V_BITS, V_CH, V_G, V_SYM,
                           D, NPV, DJV, DEV, PREC)  # fmt: skip
            acc2 = acc2 * alpha[:, None] + pv
            pv = _pv_mixed(p, vb, vs, vl, vw, pos, jv, mask_n, qv, cap, Wv, bh, 3, V_BITS, V_CH, V_G, V_SYM,
                           D, NPV, DJV, DEV, PREC)  # fmt: skip
            acc3 = acc3 * alpha[:, None] + pv
    row = (bh * n_splits + sp) * BLOCK_H + r
    tl.store(m_ptr + row, m_i)
    tl.store(l_ptr + row, l_i)
    a_ptr = acc_ptr + row[:, None] * D_P + (jv * NPV)[None, :]
    a_m = jv[None, :] < DJV
    tl.store(a_ptr, acc0, mask=a_m)
    if NPV > 1:
        tl.store(a_ptr + 1, acc1, mask=a_m)
    if NPV > 2:
        tl.store(a_ptr + 2, acc2, mask=a_m)
        tl.store(a_ptr + 3, acc3, mask=a_m)


@triton.jit
def _attn_kvq_combine_kernel(
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


def _n_splits(n: int, programs: int, device: torch.device, block_n: int) -> int:
    """Splits of the n positions so that programs * splits fills the GPU about four times over."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(-(-n // block_n), -(-4 * sms // programs)))


def _check(q: torch.Tensor, Hkv: int, n: int, block_n: int) -> None:
    B, Hq, D = q.shape
    if D & (D - 1) or Hq % Hkv or n < 1:
        raise ValueError(
            f"attn_kvq: head dim {D} must be a power of two, {Hq} query heads a multiple of {Hkv}"
            f" and {n} positions >= 1"
        )
    if block_n < 16 or block_n & (block_n - 1):
        # tl.dot(p [heads, BLOCK_N], v [BLOCK_N, D]) needs K >= 16 on the GPU (the interpreter accepts less)
        raise ValueError(f"attn_kvq: block_n {block_n} must be a power of two >= 16")


IMPLS = ("planes", "dequant")
PRECISIONS = ("tf32x3", "tf32")


def _impl(impl: str | None) -> str:
    """The kernel to run: `impl`, else $WORKBENCH_KVQ_IMPL, else "planes"."""
    impl = impl or os.environ.get("WORKBENCH_KVQ_IMPL") or "planes"
    if impl not in IMPLS:
        raise ValueError(f"attn_kvq: kernel '{impl}' (choose {' or '.join(IMPLS)})")
    return impl


def _launch(
    q, k, v, n, qk, qv, sm_scale, block_n, n_splits, length=None, num_warps=None, prec="tf32x3", impl=None,
    num_stages=None,
):  # fmt: skip
    """Both kernels; n is the (host) number of positions, or the capacity when `length` holds it on device."""
    B, Hq, D = q.shape
    Hkv, cap = k["codes"].shape[1], k["codes"].shape[2]
    _check(q, Hkv, n, block_n)
    if v["codes"].shape[2] != cap:
        raise ValueError(f"attn_kvq: key capacity {cap} != value capacity {v['codes'].shape[2]}")
    if _impl(impl) == "planes":
        kernel = _attn_kvq_planes_kernel
    else:
        kernel = _attn_kvq_split_kernel
    rep = Hq // Hkv
    block_h, d_p = max(16, triton.next_power_of_2(rep)), max(16, D)  # tl.dot wants >= 16 rows and columns
    splits = n_splits or _n_splits(n, B * Hkv, q.device, block_n)
    chunk = -(-(-(-n // splits)) // block_n) * block_n  # positions per split, a multiple of block_n
    splits = -(-n // chunk)  # every split holds >= 1 position
    rows = B * Hkv * splits * block_h  # one fp32 workspace: m, l [rows], acc [rows, d_p], then out
    ws = torch.empty(rows * (d_p + 2) + B * Hq * D, dtype=torch.float32, device=q.device)
    m, l_sum, acc = ws[:rows], ws[rows : 2 * rows], ws[2 * rows : rows * (d_p + 2)]
    out = ws[rows * (d_p + 2) :].view(B, Hq, D)

    def win(side):
        w = side["window"]
        return (w if w is not None and w.shape[2] else q.new_zeros(B, Hkv, 1, D)).contiguous()

    kw, vw = win(k), win(v)
    dev = length is not None
    if kernel is _attn_kvq_planes_kernel:
        # H200 sweep (RESULTS, "Bit-plane kernel"): 4 warps, no software pipelining; Triton's default 3
        # stages need 248 KB of shared memory at D 128 / BLOCK_N 64 and do not launch (232 KB per SM)
        opts = {"num_warps": num_warps or 4, "num_stages": num_stages or 1}
    else:
        opts = {"num_warps": num_warps or (4 if d_p * block_n <= 4096 else 8)}
        if num_stages:
            opts["num_stages"] = num_stages
    kernel[(B * Hkv, splits)](
        q.contiguous(), m, l_sum, acc,
        k["codes"], k["scale"], k["lo"] if k["lo"] is not None else k["scale"], kw,
        v["codes"], v["scale"], v["lo"] if v["lo"] is not None else v["scale"], vw,
        n, qk, qv, cap, kw.shape[2], vw.shape[2], Hq, Hkv, sm_scale, chunk, splits,
        length if dev else k["codes"], k.get("residual", 0), v.get("residual", 0),
        k["bits"], k["per_channel"], k["group"], k["lo"] is None,
        v["bits"], v["per_channel"], v["group"], v["lo"] is None,
        D, d_p, block_n, block_h, dev, prec, **opts,
    )  # fmt: skip
    _attn_kvq_combine_kernel[(B * Hq,)](m, l_sum, acc, out, Hq, Hkv, splits, D, d_p, block_h, 16, num_warps=4)
    return out


def attn_kvq(
    q: torch.Tensor,
    k: dict,
    v: dict,
    n: int,
    sm_scale: float,
    block_n: int = 64,
    n_splits: int | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Decode attention of q [B, Hq, D] over n cached positions; returns float32 [B, Hq, D].

    k / v: {"codes", "scale", "lo" (None: symmetric), "window" [B, Hkv, W, D], "q" (quantized prefix),
    "bits" (2, 4, 8), "per_channel" (bool), "group" (G)} as `QuantKVSide.kernel_args()` gives them.
    n_splits: how many programs share one kv head's positions (None: from the SM count and n).
    impl: "planes" (`_attn_kvq_planes_kernel`, the default) or "dequant" (`_attn_kvq_split_kernel`).
    """
    return _launch(q, k, v, n, k["q"], v["q"], sm_scale, block_n, n_splits, impl=impl)


def attn_kvq_static(
    q: torch.Tensor,
    k: dict,
    v: dict,
    length: torch.Tensor,
    sm_scale: float,
    block_n: int = 64,
    n_splits: int | None = None,
    num_warps: int | None = None,
    precision: str = "tf32x3",
    impl: str | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """`attn_kvq` with the length on the device (int64 [1]): one launch serves every step of a CUDA graph.

    k / v: `StaticKVSide.kernel_args()` (workbench/runtime/kvstatic.py): the window is a ring of W slots
    (position p in slot p % W) and "residual" is the spec's R; the quantized prefix of each side follows
    from the length in the kernel. The grid covers the capacity; splits past the length do no work.
    precision: the tl.dot input precision, "tf32x3" (float32-accurate, the default) or "tf32" (one MMA
    pass, 10-bit mantissas: for timing the cost of exactness; not checked against the twin at 1e-4).
    impl / num_stages: the kernel (see `attn_kvq`) and Triton's software-pipelining depth (None: its default).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"attn_kvq_static: precision '{precision}' (choose {', '.join(PRECISIONS)})")
    cap = k["codes"].shape[2]
    return _launch(
        q, k, v, cap, 0, 0, sm_scale, block_n, n_splits, length, num_warps, precision, impl, num_stages
    )
