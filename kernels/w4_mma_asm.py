"""Inline PTX of the W4 tensor-core GEMV (``gemv_mma``): decode a lane's packed words into mma fragments.

One call handles one lane's ``pack=8`` elements: 16 bytes of each of its two weight rows a, b (channels g
and g + 8 of the warp's 16), for one K step of 128 columns = 8 ``mma.sync.m16n8k16`` k-tiles.  The
weights are the A operand, x the B operand (mma column m = x row).  Two schemes:

* **rounded** (fp16 activations, groups smaller than a step): A = fp16(q s), one ``fma`` per two codes
  (v s - base s is exact before its one rounding), plus one mma per k-tile with the constant A = -z s for
  the zero point.  The group scale may change between the lane's chunks, so it must be applied before
  the mma.  Error: q s rounded to fp16 (~1e-3 relative on the output).
* **exact** (fp16 or bf16, group >= 128 columns or per channel: one scale per row for the whole step):
  A = q exactly (v - base, an ``fma`` by 1), the mma sums q x into a step accumulator, a second chain of
  mmas with A = 1 gives the step's sum of x, and the lane applies y += s * (sum q x) + (-z s) * (sum x)
  in fp32 once per step.  Every product and sum is fp32 (s, z are fp16: -z s is exact in fp32).  bf16 has
  7 mantissa bits, so the high nibble is shifted down first (one ``shr`` per two codes); fp16 ORs it in
  place (0x5400: 64 + q, the ulp of 64 being 1/16).

By the packing layout (``workbench.quant.packing``: slot s of chunk word w is column 4 s + w), ``prmt``
of byte j of words (2u, 2u + 1) gives two adjacent columns per half-register pair, so the matching x
pair is one 32-bit word of x (the B fragment as loaded).  Paper: Frantar et al., "MARLIN: Mixed-Precision
Auto-Regressive Parallel Inference on Large Language Models", 2024, https://arxiv.org/abs/2408.11743
(decode into fragments in registers); Kim et al., "Who Says Elephants Can't Run: Bringing Large Scale MoE
Models into Cloud Scale Production", 2022, https://arxiv.org/abs/2211.10017 (the 0x6400 fp16 trick).
"""

from __future__ import annotations


def _sel(b: int) -> int:
    """prmt selector: byte b of the first word into bytes 0-1, byte b of the second into bytes 2-3."""
    return b | (b << 4) | ((4 + b) << 8) | ((4 + b) << 12)


def w4_asm(rows16: bool, has_zero: bool, bf16: bool = False, exact: bool = False) -> tuple[str, str]:
    """PTX and constraints for one lane (``pack=8``); ``exact`` picks the exact scheme (required for bf16).

    Operands: $0-$7 acc out, $8-$15 acc in (element i of row a / b: x row 2 q + i % 2 (+ 8 for i >= 2
    when ``rows16``; else elements 2, 3 carry the zero-point partial of the same rows, summed at the
    end)); $16-$19 / $20-$23 the words of rows a / b; $24 + 8 j + e: x pair 4 j + e of the lane's chunk
    (e < 4), [$56 + ...: x rows 8..15]; then s and z, fp16 packed two per register ({s_a, s_a} x 2,
    {s_b, s_b} x 2).
    """
    if bf16 and not exact:
        raise ValueError("w4_asm: bf16 activations use the exact scheme only")
    lines = _asm_exact(rows16, has_zero, bf16) if exact else _asm_rounded(rows16, has_zero)
    n_r = 8 + 32 + (32 if rows16 else 0) + (8 if has_zero else 4)  # words, x pairs, s [, z]
    cons = ",".join(["=f"] * 8 + ["f"] * 8 + ["r"] * n_r)
    return "\n".join(lines), cons


MAIN_IN, SIDE_IN = "$8, $9, $12, $13", "$10, $11, $14, $15"
MAIN, SIDE = "$0, $1, $4, $5", "$2, $3, $6, $7"


def _asm_rounded(rows16: bool, has_zero: bool) -> list[str]:
    """fp16: A = fp16(q s) per k-tile plus the zero-point mma with A = -z s (see the module docstring)."""
    so = 88 if rows16 else 56
    zo = so + 4
    lines = [
        "{",
        ".reg .b32 %p<2>, %la, %lb, %ma, %mb, %ha, %hb, %ia, %ib, %k, %za, %zb, %zc, %zd;",
        ".reg .b32 %ska, %skb, %sfa, %sfb;",
        "mov.b32 %k, 0xE400E400;",  # -1024
    ]
    for row, sreg in (("a", so), ("b", so + 2)):
        lines += [f"mul.rn.f16x2 %sk{row}, ${sreg}, %k;"]
    lines += ["mov.b32 %k, 0xD400D400;"]  # -64
    for row, sreg in (("a", so), ("b", so + 2)):
        lines += [f"mul.rn.f16x2 %sf{row}, ${sreg}, %k;"]
    lines += ["mov.b32 %k, 0xBC00BC00;" if has_zero else "mov.b32 %k, 0xC800C800;"]  # -1 or -8
    for row, sreg, zreg in (("a", so, zo), ("b", so + 2, zo + 2)):
        zsrc = f"${zreg}" if has_zero else "%k"
        lines += [f"mul.rn.f16x2 %z{row}, {zsrc}, ${sreg};"]
        if has_zero:
            lines += [f"mul.rn.f16x2 %z{row}, %z{row}, %k;"]
    # the constant A of the zero-point mma as four distinct registers: a quad {za, zb, za, zb} would be
    # rebuilt with two moves before every mma
    lines += ["mov.b32 %k, 0x3C003C00;", "mul.rn.f16x2 %zc, %za, %k;", "mul.rn.f16x2 %zd, %zb, %k;"]
    first = True
    for j in range(4):
        for row, w0, sreg in (("a", 16, so), ("b", 20, so + 2)):
            for u in range(2):
                lo, hi = (f"%l{row}", f"%h{row}") if u == 0 else (f"%m{row}", f"%i{row}")
                lines += [
                    f"prmt.b32 %p{u}, ${w0 + 2 * u}, ${w0 + 2 * u + 1}, {_sel(j):#x};",
                    f"lop3.b32 {lo}, %p{u}, 0x000F000F, 0x64006400, 0xEA;",
                    f"lop3.b32 {hi}, %p{u}, 0x00F000F0, 0x54005400, 0xEA;",
                    f"fma.rn.f16x2 {lo}, {lo}, ${sreg}, %sk{row};",
                    f"fma.rn.f16x2 {hi}, {hi}, ${sreg}, %sf{row};",
                ]
        for a_regs, e in (("%la, %lb, %ma, %mb", 0), ("%ha, %hb, %ia, %ib", 2)):
            x = f"${24 + 8 * j + e}, ${24 + 8 * j + e + 1}"
            y = f"${56 + 8 * j + e}, ${56 + 8 * j + e + 1}"
            mi, si = (MAIN_IN, SIDE_IN) if first else (MAIN, SIDE)
            first = False
            mma = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
            if rows16:
                lines += [
                    f"{mma} {{{MAIN}}}, {{{a_regs}}}, {{{x}}}, {{{mi}}};",
                    f"{mma} {{{MAIN}}}, {{%za, %zb, %zc, %zd}}, {{{x}}}, {{{MAIN}}};",
                    f"{mma} {{{SIDE}}}, {{{a_regs}}}, {{{y}}}, {{{si}}};",
                    f"{mma} {{{SIDE}}}, {{%za, %zb, %zc, %zd}}, {{{y}}}, {{{SIDE}}};",
                ]
            else:
                lines += [
                    f"{mma} {{{MAIN}}}, {{{a_regs}}}, {{{x}}}, {{{mi}}};",
                    f"{mma} {{{SIDE}}}, {{%za, %zb, %zc, %zd}}, {{{x}}}, {{{si}}};",
                ]
    lines.append("}")
    return lines


def _asm_exact(rows16: bool, has_zero: bool, bf16: bool) -> list[str]:
    """A = q exactly; y += s (sum q x) + (-z s) (sum x) in fp32 once per step (see the module docstring)."""
    so = 88 if rows16 else 56
    zo = so + 4
    t, ab = ("bf16x2", "bf16.bf16") if bf16 else ("f16x2", "f16.f16")
    one = "0x3F803F80" if bf16 else "0x3C003C00"
    lines = [
        "{",
        ".reg .b32 %p<2>, %l<2>, %m<2>, %h<2>, %i<2>, %la, %lb, %ma, %mb, %ha, %hb, %ia, %ib;",
        ".reg .b32 %one, %nlo, %nhi, %t<2>;",
        ".reg .b16 %u<2>;",
        ".reg .f32 %q<8>, %r<8>, %fz, %sa, %sb, %za, %zb;",
        f"mov.b32 %one, {one};",
        "mov.f32 %fz, 0f00000000;",
    ]
    if bf16:  # low nibbles OR 0x4300 = 128 + q; high nibbles shifted down, the same base
        lines += ["mov.b32 %nlo, 0xC300C300;", "mov.b32 %nhi, 0xC300C300;"]
    else:  # 0x6400 | q = 1024 + q; 0x5400 | q << 4 = 64 + q
        lines += ["mov.b32 %nlo, 0xE400E400;", "mov.b32 %nhi, 0xD400D400;"]
    for row, sreg in (("a", so), ("b", so + 2)):  # the row's fp16 scale (low half) as fp32
        lines += [f"mov.b32 {{%u0, %u1}}, ${sreg};", f"cvt.f32.f16 %s{row}, %u0;"]
    for row, zreg in (("a", zo), ("b", zo + 2)):  # -z s, exact in fp32 (11-bit x 11-bit significands)
        if has_zero:
            lines += [f"mov.b32 {{%u0, %u1}}, ${zreg};", f"cvt.f32.f16 %z{row}, %u0;"]
            lines += [f"mul.f32 %z{row}, %z{row}, %s{row};", f"neg.f32 %z{row}, %z{row};"]
        else:
            lines += [f"mul.f32 %z{row}, %s{row}, 0fC1000000;"]  # symmetric: z = 8
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.f32"
    q_main, q_side, r_main, r_side = (
        "%q0, %q1, %q2, %q3",
        "%q4, %q5, %q6, %q7",
        "%r0, %r1, %r2, %r3",
        "%r4, %r5, %r6, %r7",
    )
    zero = "%fz, %fz, %fz, %fz"
    first = True
    for j in range(4):
        for row, w0 in (("a", 16), ("b", 20)):
            for u in range(2):
                lo, hi = (f"%l{row}", f"%h{row}") if u == 0 else (f"%m{row}", f"%i{row}")
                lines += [f"prmt.b32 %p{u}, ${w0 + 2 * u}, ${w0 + 2 * u + 1}, {_sel(j):#x};"]
                if bf16:
                    lines += [
                        f"lop3.b32 {lo}, %p{u}, 0x000F000F, 0x43004300, 0xEA;",
                        f"shr.b32 %t{u}, %p{u}, 4;",
                        f"lop3.b32 {hi}, %t{u}, 0x000F000F, 0x43004300, 0xEA;",
                    ]
                else:
                    lines += [
                        f"lop3.b32 {lo}, %p{u}, 0x000F000F, 0x64006400, 0xEA;",
                        f"lop3.b32 {hi}, %p{u}, 0x00F000F0, 0x54005400, 0xEA;",
                    ]
                lines += [f"fma.rn.{t} {lo}, {lo}, %one, %nlo;", f"fma.rn.{t} {hi}, {hi}, %one, %nhi;"]
        for a_regs, e in (("%la, %lb, %ma, %mb", 0), ("%ha, %hb, %ia, %ib", 2)):
            x = f"${24 + 8 * j + e}, ${24 + 8 * j + e + 1}"
            y = f"${56 + 8 * j + e}, ${56 + 8 * j + e + 1}"
            c = {k: (zero if first else k) for k in (q_main, q_side, r_main, r_side)}
            first = False
            lines += [
                f"{mma} {{{q_main}}}, {{{a_regs}}}, {{{x}}}, {{{c[q_main]}}};",
                f"{mma} {{{r_main}}}, {{%one, %one, %one, %one}}, {{{x}}}, {{{c[r_main]}}};",
            ]
            if rows16:
                lines += [
                    f"{mma} {{{q_side}}}, {{{a_regs}}}, {{{y}}}, {{{c[q_side]}}};",
                    f"{mma} {{{r_side}}}, {{%one, %one, %one, %one}}, {{{y}}}, {{{c[r_side]}}};",
                ]
    # mma D: d0, d1 = row a (x rows 2q, 2q + 1), d2, d3 = row b; acc main = $0 $1 (a) $4 $5 (b)
    outs = [("$0", "$8"), ("$1", "$9"), ("$4", "$12"), ("$5", "$13"), ("$2", "$10"), ("$3", "$11")]
    outs += [("$6", "$14"), ("$7", "$15")]
    for i, (o, a) in enumerate(outs[:4]):
        row = "a" if i < 2 else "b"
        lines += [f"fma.rn.f32 {o}, %s{row}, %q{i}, {a};"]
        if rows16:
            lines += [f"fma.rn.f32 {o}, %z{row}, %r{i}, {o};"]
    for i, (o, a) in enumerate(outs[4:]):
        row = "a" if i < 2 else "b"
        if rows16:  # x rows 8..15: decoded and zero-point parts in the same element
            lines += [
                f"fma.rn.f32 {o}, %s{row}, %q{4 + i}, {a};",
                f"fma.rn.f32 {o}, %z{row}, %r{4 + i}, {o};",
            ]
        else:  # elements 2, 3: the zero-point partial of elements 0, 1 (summed at the end)
            lines += [f"fma.rn.f32 {o}, %z{row}, %r{i}, {a};"]
    lines.append("}")
    return lines
