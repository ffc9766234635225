"""The bit-plane split-K kernel of the quantized-KV decode attention (`impl="planes"`, the default).

b-bit codes stay in bit planes: plane e of a byte row holds channel j * 8/b + e of byte j, so codes reach
`tl.dot` from one shift and mask. Layout, grid and workspace: kernels/attn_kvq.py.
"""

from __future__ import annotations

import triton
import triton.language as tl
from workbench.kernels.attn_kvq_common import head_base, quantized_prefix_len, win_slot


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with float32 accumulation: "fp16" rounds both operands to fp16 (one MMA pass at half the operand
    registers of tf32), else `tl.dot`'s input precision PREC ("tf32", "tf32x3")."""
    if PREC == "fp16":
        x = tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        x = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    return x


@triton.jit
def _dot_codes(a, code, PREC: tl.constexpr):
    """a (float32) @ code (small unsigned integer codes, exact in tf32, bf16, fp16), float32 accumulation.

    "tf32x3": a = hi + rest with hi a's top 10 mantissa bits, two tf32 passes; only rest's rounding (~2^-21
    relative) is lost. "tf32": one pass (10-bit mantissas). "fp16": one pass, a rounded to 11 mantissa
    bits, the codes exact (0..255). (A split into two fp16 halves against fp16 codes measured no
    faster on the H200, 2026-12-03: benchmarks/bench_kv_step_h200_planes_sweep2.json.)
    """
    if PREC == "tf32x3":
        b = code.to(tl.float32)
        hi = (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        x = tl.dot(hi, b, input_precision="tf32") + tl.dot(a - hi, b, input_precision="tf32")
    else:
        x = _dot(a, code, PREC)
    return x


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
def _chan(j, e: tl.constexpr, BITS: tl.constexpr, DJ: tl.constexpr):
    """The channel of column j of plane e: j * (8 / BITS) + e for sub-byte codes (the planes of one byte
    row), e * DJ + j for int8 (plane e: bytes e * DJ .. e * DJ + DJ - 1 of the row)."""
    if BITS == 8:
        c = e * DJ + j
    else:
        c = j * (8 // BITS) + e
    return c


@triton.jit
def _bytes(
    codes_ptr, pos, j, ok, cap, bh, e: tl.constexpr, BITS: tl.constexpr, ROW: tl.constexpr, DJ: tl.constexpr,
    DJ_P: tl.constexpr, ALL: tl.constexpr,
):  # fmt: skip
    """uint8 code bytes [BLOCK_N, DJ_P] of plane e (all planes for sub-byte codes) of positions `pos` (rows
    of ROW bytes); 0 where not `ok` [BLOCK_N].

    ALL: every position is valid (`ok` unused), so a row of DJ = DJ_P bytes loads without a mask.
    (No code may follow a return under a constexpr `if` here: Triton's code generator still compiles it.)
    """
    col = e * DJ if BITS == 8 else 0
    ptr = codes_ptr + head_base(bh, cap * ROW) + pos[:, None] * ROW + col + j[None, :]
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
    c = _chan(j, e, BITS, D // NP)  # the channel of each plane column
    if PER_CHANNEL:
        off = head_base(bh, (cap // G) * D) + (pos[:, None] // G) * D + c[None, :]
    else:
        off = head_base(bh, cap * (D // G)) + pos[:, None] * (D // G) + c[None, :] // G
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
    w_off = head_base(bh, W * D) + win_slot(pos, q_len, W, RING)[:, None] * D + _chan(j, e, BITS, DJ)[None, :]
    w = tl.load(win_ptr + w_off, mask=in_w[:, None] & mj, other=0.0).to(tl.float32)
    return tl.where(in_q[:, None], x, w)


@triton.jit
def _group_rows(ptr, s_off, c, mj, grp, NGB: tl.constexpr, D: tl.constexpr):
    """Per-channel rows [BLOCK_N, DJ_P] (float32) of a block over NGB >= 2 key groups: position n gets the
    row of its group grp [BLOCK_N, 1]; NGB row loads [DJ_P] and selects instead of a per-element gather."""
    x = tl.load(ptr + s_off + c, mask=mj, other=0.0).to(tl.float32)[None, :]
    for g in tl.static_range(1, NGB):
        row = tl.load(ptr + s_off + g * D + c, mask=mj, other=0.0).to(tl.float32)[None, :]
        x = tl.where(grp == g, row, x)
    return x


@triton.jit
def _scores_codes(
    q0, q1, q2, q3, b0, b1, b2, b3, ks, kl, pos, start, j, cap, bh, BITS: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    G: tl.constexpr, SYM: tl.constexpr, D: tl.constexpr, NP: tl.constexpr, DJ: tl.constexpr,
    BLOCK_N: tl.constexpr, PREC: tl.constexpr, SEL: tl.constexpr,
):  # fmt: skip
    """q . keys of a whole-code block at `start` -> [BLOCK_H, BLOCK_N], q and the code bytes b0 .. b3 given
    as the side's NP channel planes (`_chan`; sub-byte codes: one byte tile, b0 = b1 = ...).

    Per-channel keys with the block inside one group of G tokens: the block's scale goes onto q,
    (q * scale) . code + q . lo (or - 2^(b-1) * sum(q * scale)), the codes meeting the MMA exactly; a block
    over several whole groups, with SEL, dequantizes with each group's scale row picked by `tl.where`
    (`_group_rows`: no [BLOCK_N, DJ] gather of scales, its addresses and its L1 traffic); other layouts
    dequantize each element.
    """
    mj = j < DJ
    if PER_CHANNEL and G % BLOCK_N == 0:
        s_off = head_base(bh, (cap // G) * D) + (start // G) * D
        s = tl.zeros((q0.shape[0], BLOCK_N), tl.float32)
        bias = tl.zeros((q0.shape[0],), tl.float32)
        for e in tl.static_range(NP):
            qe = _pick(e, q0, q1, q2, q3)
            c = _chan(j, e, BITS, DJ)
            qs = qe * tl.load(ks + s_off + c, mask=mj, other=0.0).to(tl.float32)[None, :]
            s += _dot_codes(qs, tl.trans(_plane(_pick(e, b0, b1, b2, b3), e, BITS)), PREC)
            if SYM:
                bias -= (1 << (BITS - 1)) * tl.sum(qs, 1)
            else:
                bias += tl.sum(qe * tl.load(kl + s_off + c, mask=mj, other=0.0).to(tl.float32)[None, :], 1)
        s += bias[:, None]
    elif PER_CHANNEL and BLOCK_N % G == 0 and SEL:  # BLOCK_N / G key groups: their scale rows selected
        s_off = head_base(bh, (cap // G) * D) + (start // G) * D
        grp = ((pos - start) // G)[:, None]
        s = tl.zeros((q0.shape[0], BLOCK_N), tl.float32)
        for e in tl.static_range(NP):
            c = _chan(j, e, BITS, DJ)
            code = _plane(_pick(e, b0, b1, b2, b3), e, BITS).to(tl.float32)
            if SYM:
                k = (code - (1 << (BITS - 1))) * _group_rows(ks, s_off, c, mj, grp, BLOCK_N // G, D)
            else:
                k = code * _group_rows(ks, s_off, c, mj, grp, BLOCK_N // G, D) + _group_rows(
                    kl, s_off, c, mj, grp, BLOCK_N // G, D
                )
            s += _dot(_pick(e, q0, q1, q2, q3), tl.trans(k), PREC)
    else:
        m = (pos >= 0)[:, None] & mj[None, :]
        s = tl.zeros((q0.shape[0], BLOCK_N), tl.float32)
        for e in tl.static_range(NP):
            code = _plane(_pick(e, b0, b1, b2, b3), e, BITS)
            k = _deq_plane(code, ks, kl, pos, j, m, cap, bh, e, BITS, PER_CHANNEL, G, SYM, D, NP)
            s += _dot(_pick(e, q0, q1, q2, q3), tl.trans(k), PREC)
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
        ps = p * tl.load(vs + head_base(bh, cap) + pos).to(tl.float32)[None, :]
        pv = _dot_codes(ps, _plane(byte, e, BITS), PREC)
        if SYM:
            pv -= (1 << (BITS - 1)) * tl.sum(ps, 1)[:, None]
        else:
            pv += tl.sum(p * tl.load(vl + head_base(bh, cap) + pos).to(tl.float32)[None, :], 1)[:, None]
    else:
        m = (pos >= 0)[:, None] & (j[None, :] < DJ)
        v = _deq_plane(_plane(byte, e, BITS), vs, vl, pos, j, m, cap, bh, e, BITS, PER_CHANNEL, G, SYM, D, NP)
        pv = _dot(p, v, PREC)
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
    return _dot(p, v, PREC)


@triton.jit
def _online(s, m_i, l_i):
    """Online-softmax step of scores s [BLOCK_H, BLOCK_N]: (new max, p, rescale of the old sums, new sum)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    return m_new, p, alpha, l_i * alpha + tl.sum(p, 1)


@triton.jit
def attn_kvq_planes_kernel(
    q_ptr, m_ptr, l_ptr, acc_ptr,
    kc, ks, kl, kw, vc, vs, vl, vw,
    n, qk, qv, cap, Wk, Wv, Hq, Hkv, sm_scale, chunk, n_splits, len_ptr, Rk, Rv,
    K_BITS: tl.constexpr, K_CH: tl.constexpr, K_G: tl.constexpr, K_SYM: tl.constexpr,
    V_BITS: tl.constexpr, V_CH: tl.constexpr, V_G: tl.constexpr, V_SYM: tl.constexpr,
    D: tl.constexpr, D_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    DEV: tl.constexpr, PREC: tl.constexpr, TAIL_N: tl.constexpr, CHUNK8: tl.constexpr, SEL: tl.constexpr,
):  # fmt: skip
    """`attn_kvq_dequant_kernel`'s job with the codes in bit planes: no unpacking join, no branch per block.

    A byte row of b-bit codes holds 8 / b channels per byte: plane e is channel j * 8 / b + e of byte j. int8
    rows are cut into D / CHUNK8 planes of CHUNK8 consecutive channels (CHUNK8 0: one plane of D), so each dot
    sees a [BLOCK_N, <= CHUNK8] tile. The query is loaded as the key side's NP planes and the accumulator kept
    as the value side's NP planes (stored back in channel order, `_chan`), so the codes go to `tl.dot`
    straight from a shift and a mask. Blocks wholly below both quantized prefixes run a branch-free loop (the
    scales onto q and p where the layout allows, `_scores_codes` / `_pv_codes`); the rest of the split (the
    block holding a prefix boundary, the window) runs a masked loop over blocks of TAIL_N that mixes codes
    and window (`_mixed_plane`). SEL: per-channel key scales of a block over several groups by row selection
    (`_scores_codes`).
    """
    NPK: tl.constexpr = 8 // K_BITS if K_BITS < 8 else (D // CHUNK8 if CHUNK8 > 0 else 1)  # planes
    NPV: tl.constexpr = 8 // V_BITS if V_BITS < 8 else (D // CHUNK8 if CHUNK8 > 0 else 1)
    ROWK: tl.constexpr = D * K_BITS // 8  # bytes per row
    ROWV: tl.constexpr = D * V_BITS // 8
    DJK: tl.constexpr = D // NPK  # channels per plane = bytes per plane's row
    DJV: tl.constexpr = D // NPV
    DJK_P: tl.constexpr = DJK if DJK >= 16 else 16  # tl.dot wants >= 16 along K and N
    DJV_P: tl.constexpr = DJV if DJV >= 16 else 16
    if DEV:
        n = tl.load(len_ptr).to(tl.int32)
        qk = quantized_prefix_len(n, Rk, K_CH, K_G)
        qv = quantized_prefix_len(n, Rv, V_CH, V_G)
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
    q0 = tl.load(q_base + _chan(jk, 0, K_BITS, DJK)[None, :], mask=q_m, other=0.0).to(tl.float32)
    q1, q2, q3 = q0, q0, q0
    if NPK > 1:
        q1 = tl.load(q_base + _chan(jk, 1, K_BITS, DJK)[None, :], mask=q_m, other=0.0).to(tl.float32)
    if NPK > 2:
        q2 = tl.load(q_base + _chan(jk, 2, K_BITS, DJK)[None, :], mask=q_m, other=0.0).to(tl.float32)
        q3 = tl.load(q_base + _chan(jk, 3, K_BITS, DJK)[None, :], mask=q_m, other=0.0).to(tl.float32)
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
        ok = pos >= 0
        kb0 = _bytes(kc, pos, jk, ok, cap, bh, 0, K_BITS, ROWK, DJK, DJK_P, True)
        kb1, kb2, kb3 = kb0, kb0, kb0
        if K_BITS == 8 and NPK > 1:
            kb1 = _bytes(kc, pos, jk, ok, cap, bh, 1, K_BITS, ROWK, DJK, DJK_P, True)
        if K_BITS == 8 and NPK > 2:
            kb2 = _bytes(kc, pos, jk, ok, cap, bh, 2, K_BITS, ROWK, DJK, DJK_P, True)
            kb3 = _bytes(kc, pos, jk, ok, cap, bh, 3, K_BITS, ROWK, DJK, DJK_P, True)
        vb0 = _bytes(vc, pos, jv, ok, cap, bh, 0, V_BITS, ROWV, DJV, DJV_P, True)  # loads in flight at once
        vb1, vb2, vb3 = vb0, vb0, vb0
        if V_BITS == 8 and NPV > 1:
            vb1 = _bytes(vc, pos, jv, ok, cap, bh, 1, V_BITS, ROWV, DJV, DJV_P, True)
        if V_BITS == 8 and NPV > 2:
            vb2 = _bytes(vc, pos, jv, ok, cap, bh, 2, V_BITS, ROWV, DJV, DJV_P, True)
            vb3 = _bytes(vc, pos, jv, ok, cap, bh, 3, V_BITS, ROWV, DJV, DJV_P, True)
        s = _scores_codes(q0, q1, q2, q3, kb0, kb1, kb2, kb3, ks, kl, pos, start, jk, cap, bh, K_BITS, K_CH,
                          K_G, K_SYM, D, NPK, DJK, BLOCK_N, PREC, SEL)  # fmt: skip
        m_i, p, alpha, l_i = _online(s * sm_scale, m_i, l_i)
        acc0 = acc0 * alpha[:, None] + _pv_codes(
            p, vb0, vs, vl, pos, jv, cap, bh, 0, V_BITS, V_CH, V_G, V_SYM, D, NPV, DJV, PREC
        )
        if NPV > 1:
            acc1 = acc1 * alpha[:, None] + _pv_codes(
                p, vb1, vs, vl, pos, jv, cap, bh, 1, V_BITS, V_CH, V_G, V_SYM, D, NPV, DJV, PREC
            )
        if NPV > 2:
            acc2 = acc2 * alpha[:, None] + _pv_codes(
                p, vb2, vs, vl, pos, jv, cap, bh, 2, V_BITS, V_CH, V_G, V_SYM, D, NPV, DJV, PREC
            )
            acc3 = acc3 * alpha[:, None] + _pv_codes(
                p, vb3, vs, vl, pos, jv, cap, bh, 3, V_BITS, V_CH, V_G, V_SYM, D, NPV, DJV, PREC
            )
    for start in range(mid, hi, TAIL_N):  # the rest: a prefix boundary, the window, the split's end
        pos = start + tl.arange(0, TAIL_N)
        mask_n = pos < hi
        s = tl.zeros((BLOCK_H, TAIL_N), tl.float32)
        for e in tl.static_range(NPK):  # int8: one byte tile per plane; sub-byte: one for all (CSE'd)
            kb = _bytes(kc, pos, jk, (pos < qk) & mask_n, cap, bh, e, K_BITS, ROWK, DJK, DJK_P, False)
            k = _mixed_plane(kb, ks, kl, kw, pos, jk, mask_n, qk, cap, Wk, bh, e, K_BITS, K_CH, K_G, K_SYM, D,
                             NPK, DJK, DEV)  # fmt: skip
            s += _dot(_pick(e, q0, q1, q2, q3), tl.trans(k), PREC)
        s = tl.where(mask_n[None, :], s * sm_scale, float("-inf"))
        m_i, p, alpha, l_i = _online(s, m_i, l_i)
        v_ok = (pos < qv) & mask_n
        vb = _bytes(vc, pos, jv, v_ok, cap, bh, 0, V_BITS, ROWV, DJV, DJV_P, False)
        pv = _pv_mixed(p, vb, vs, vl, vw, pos, jv, mask_n, qv, cap, Wv, bh, 0, V_BITS, V_CH, V_G, V_SYM, D,
                       NPV, DJV, DEV, PREC)  # fmt: skip
        acc0 = acc0 * alpha[:, None] + pv
        if NPV > 1:
            vb = _bytes(vc, pos, jv, v_ok, cap, bh, 1, V_BITS, ROWV, DJV, DJV_P, False)
            pv = _pv_mixed(p, vb, vs, vl, vw, pos, jv, mask_n, qv, cap, Wv, bh, 1, V_BITS, V_CH, V_G, V_SYM,
                           D, NPV, DJV, DEV, PREC)  # fmt: skip
            acc1 = acc1 * alpha[:, None] + pv
        if NPV > 2:
            vb = _bytes(vc, pos, jv, v_ok, cap, bh, 2, V_BITS, ROWV, DJV, DJV_P, False)
            pv = _pv_mixed(p, vb, vs, vl, vw, pos, jv, mask_n, qv, cap, Wv, bh, 2, V_BITS, V_CH, V_G, V_SYM,
                           D, NPV, DJV, DEV, PREC)  # fmt: skip
            acc2 = acc2 * alpha[:, None] + pv
            vb = _bytes(vc, pos, jv, v_ok, cap, bh, 3, V_BITS, ROWV, DJV, DJV_P, False)
            pv = _pv_mixed(p, vb, vs, vl, vw, pos, jv, mask_n, qv, cap, Wv, bh, 3, V_BITS, V_CH, V_G, V_SYM,
                           D, NPV, DJV, DEV, PREC)  # fmt: skip
            acc3 = acc3 * alpha[:, None] + pv
    row = (bh * n_splits + sp) * BLOCK_H + r
    tl.store(m_ptr + row, m_i)
    tl.store(l_ptr + row, l_i)
    a_ptr = acc_ptr + row[:, None] * D_P
    a_m = jv[None, :] < DJV
    tl.store(a_ptr + _chan(jv, 0, V_BITS, DJV)[None, :], acc0, mask=a_m)
    if NPV > 1:
        tl.store(a_ptr + _chan(jv, 1, V_BITS, DJV)[None, :], acc1, mask=a_m)
    if NPV > 2:
        tl.store(a_ptr + _chan(jv, 2, V_BITS, DJV)[None, :], acc2, mask=a_m)
        tl.store(a_ptr + _chan(jv, 3, V_BITS, DJV)[None, :], acc3, mask=a_m)
