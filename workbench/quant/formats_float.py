"""Float quantization formats: FP8 (E4M3, E5M2), FP4 E2M1 (plain, MXFP4, NVFP4) and NF4.

All functions take a grouped float32 weight `Wg` [R, n_groups, G] (see formats.py) and return uint8 codes of
the same shape plus float32 scales [R, n_groups]. Codes are the format's bit pattern:
    fp8      the 8-bit E4M3 / E5M2 pattern (identical to `tensor.to(torch.float8_e4m3fn).view(torch.uint8)`)
    E2M1     the 4-bit pattern sign<<3 | exp<<1 | mantissa; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6
    nf4      index 0..15 into NF4_LEVELS
Value = decode(code) * scale (* tensor_scale for nvfp4). Rounding is round-to-nearest-even with saturation
at the format's largest finite value (OCP FP8 / MX convention).

References: OCP 8-bit floating point spec (E4M3/E5M2), OCP Microscaling Formats (MX) v1.0
(https://www.opencompute.org/documents/ocp-microscaling-formats-mx-v1-0-spec-final-pdf), NVIDIA NVFP4
(block 16, E4M3 scale, fp32 per-tensor scale), QLoRA NF4 (https://arxiv.org/abs/2305.14314).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from workbench.quant.formats import FP16_MAX, FP16_MIN_SUBNORMAL, Encoded

if TYPE_CHECKING:
    from workbench.quant.spec import QuantSpec


@dataclass(frozen=True)
class Minifloat:
    """A small IEEE-like float: 1 sign bit, `exp_bits`, `man_bits`, exponent `bias`, saturating `max_value`.

    `nan_top`: the top code of the top binade is NaN (E4M3 "fn"); `inf_top_binade`: the whole top binade is
    inf/NaN (E5M2, IEEE-like).
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_value: float
    nan_top: bool = False
    inf_top_binade: bool = False

    @property
    def min_exp(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias


E4M3 = Minifloat("e4m3", 4, 3, 7, 448.0, nan_top=True)
E5M2 = Minifloat("e5m2", 5, 2, 15, 57344.0, inf_top_binade=True)
E2M1 = Minifloat("e2m1", 2, 1, 1, 6.0)
FP8 = {"fp8_e4m3": E4M3, "fp8_e5m2": E5M2}

# The 16 NormalFloat-4 levels of QLoRA (bitsandbytes' NF4 table), ascending.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


# ---------------------------------------------------------------------------------------------- minifloats
def minifloat_round(x: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """Round float32 `x` to the nearest value of `fmt` (ties to even), saturating at +-max_value."""
    a = x.abs().clamp(max=fmt.max_value)
    _, ex = torch.frexp(a)  # a = m * 2^ex, m in [0.5, 1)
    e = (ex - 1).clamp(min=fmt.min_exp)  # binade exponent; subnormals share min_exp
    quantum = torch.ldexp(torch.ones_like(a), e - fmt.man_bits)
    y = (torch.round(a / quantum) * quantum).clamp(max=fmt.max_value)
    return torch.copysign(y, x)


def minifloat_encode(x: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """Bit patterns (uint8) of `x` rounded to `fmt`; the sign of zero is kept (-0 -> sign bit set)."""
    y = minifloat_round(x, fmt)
    a = y.abs()
    _, ex = torch.frexp(a)
    e = ex - 1
    normal = (e >= fmt.min_exp) & (a > 0)
    e_n = torch.where(normal, e, torch.full_like(e, fmt.min_exp))
    exp_field = torch.where(normal, e + fmt.bias, torch.zeros_like(e))
    # normal: a = 2^e (1 + m / 2^M); subnormal: a = 2^min_exp * m / 2^M
    frac = torch.ldexp(a, (fmt.man_bits - e_n).to(torch.int32))
    man = torch.where(normal, frac - 2**fmt.man_bits, frac).round().to(torch.int32)
    sign = torch.signbit(y).to(torch.int32)
    code = (sign << (fmt.exp_bits + fmt.man_bits)) | (exp_field.to(torch.int32) << fmt.man_bits) | man
    return code.to(torch.uint8)


@lru_cache(maxsize=None)
def minifloat_table(fmt: Minifloat) -> torch.Tensor:
    """float32 [2^(1+E+M)]: the value of every bit pattern (NaN / inf where the format has them)."""
    n_bits = 1 + fmt.exp_bits + fmt.man_bits
    vals = []
    for code in range(2**n_bits):
        sign = -1.0 if code >> (n_bits - 1) else 1.0
        exp_field = (code >> fmt.man_bits) & (2**fmt.exp_bits - 1)
        man = code & (2**fmt.man_bits - 1)
        top = exp_field == 2**fmt.exp_bits - 1
        if fmt.inf_top_binade and top:
            v = float("inf") if man == 0 else float("nan")
        elif fmt.nan_top and top and man == 2**fmt.man_bits - 1:
            v = float("nan")
        elif exp_field == 0:
            v = man / 2**fmt.man_bits * 2.0**fmt.min_exp
        else:
            v = (1 + man / 2**fmt.man_bits) * 2.0 ** (exp_field - fmt.bias)
        vals.append(sign * v)
    return torch.tensor(vals, dtype=torch.float32)


def minifloat_decode(codes: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """Values (float32) of uint8 bit patterns (on the codes' device)."""
    return minifloat_table(fmt).to(codes.device)[codes.long()]


def scaled_decode(codes: torch.Tensor, scales: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """decode(codes) [R, ng, G] * scales [R, ng]."""
    return minifloat_decode(codes, fmt) * scales.unsqueeze(-1)


def _absmax(Wg: torch.Tensor, shrink) -> torch.Tensor:
    amax = Wg.abs().amax(-1)
    return amax * shrink if shrink is not None else amax


def _safe_div(Wg: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Wg / scales[..., None], with zero scales giving zero (all-zero groups)."""
    s = scales.unsqueeze(-1)
    return torch.where(s > 0, Wg / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(Wg))


# ---------------------------------------------------------------------------------------------- formats
def fp8_encode(Wg: torch.Tensor, fmt: Minifloat, shrink=None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 with an fp32 scale per group (channel or tensor): scale = absmax / max_value."""
    amax = _absmax(Wg, shrink)
    scales = torch.where(amax > 0, amax / fmt.max_value, torch.ones_like(amax))
    return minifloat_encode(Wg / scales.unsqueeze(-1), fmt), scales


def fp4_encode(Wg: torch.Tensor, shrink=None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 E2M1 with an fp16 scale per group: scale = absmax / 6."""
    amax = _absmax(Wg, shrink)
    scales = torch.where(amax > 0, amax / E2M1.max_value, torch.ones_like(amax))
    scales = scales.clamp(FP16_MIN_SUBNORMAL, FP16_MAX).half().float()
    return minifloat_encode(Wg / scales.unsqueeze(-1), E2M1), scales


def mxfp4_encode(Wg: torch.Tensor, shrink=None) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 (OCP MX v1.0): shared E8M0 scale 2^(floor(log2(absmax)) - 2) per block, E2M1 elements.

    emax of E2M1 is 2, so the block's largest element lands in [4, 8) and values above 6 saturate.
    """
    amax = _absmax(Wg, shrink)
    _, ex = torch.frexp(amax)
    e = torch.where(amax > 0, ex - 1 - 2, torch.zeros_like(ex)).clamp(-127, 127)
    scales = torch.ldexp(torch.ones_like(amax), e)
    return minifloat_encode(Wg / scales.unsqueeze(-1), E2M1), scales


def nvfp4_encode(Wg: torch.Tensor, shrink=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4: fp32 tensor scale = absmax(W) / (448 * 6); E4M3 block scale = e4m3(absmax_b / 6 / ts).

    Returns codes, block scales (float32 holding E4M3 values) and the tensor scale (float32 scalar).
    A block whose scale underflows E4M3 is stored as zeros.
    """
    gmax = Wg.abs().amax()
    ts = torch.where(gmax > 0, gmax / (E4M3.max_value * E2M1.max_value), torch.ones_like(gmax))
    amax = _absmax(Wg, shrink)
    scales = minifloat_round(amax / E2M1.max_value / ts, E4M3)
    return minifloat_encode(_safe_div(Wg, scales * ts), E2M1), scales, ts.float()


def nf4_encode(Wg: torch.Tensor, shrink=None) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4: fp16 absmax per group, each weight / absmax -> index of the nearest of the 16 NF4 levels."""
    amax = _absmax(Wg, shrink)
    scales = torch.where(amax > 0, amax, torch.ones_like(amax)).clamp(FP16_MIN_SUBNORMAL, FP16_MAX)
    scales = scales.half().float()
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=Wg.device)
    mids = (levels[1:] + levels[:-1]) / 2
    x = (Wg / scales.unsqueeze(-1)).clamp(-1, 1)
    return torch.bucketize(x.contiguous(), mids).to(torch.uint8), scales


def nf4_decode(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """NF4_LEVELS[codes] [R, ng, G] * scales [R, ng]."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=codes.device)
    return levels[codes.long()] * scales.unsqueeze(-1)


# ------------------------------------------------------------------------------------------ registry entries
# Uniform signatures for the format registry (registry.py): encode(spec, Wg, shrink) -> Encoded and
# decode(spec, Encoded) -> float32 values [R, n_groups, G].
def encode_fp8(spec: QuantSpec, Wg: torch.Tensor, shrink=None) -> Encoded:
    return Encoded(*fp8_encode(Wg, FP8[spec.fmt], shrink), None)


def decode_fp8(spec: QuantSpec, enc: Encoded) -> torch.Tensor:
    return scaled_decode(enc.codes, enc.scales, FP8[spec.fmt])


def encode_fp4(spec: QuantSpec, Wg: torch.Tensor, shrink=None) -> Encoded:
    return Encoded(*fp4_encode(Wg, shrink), None)


def encode_mxfp4(spec: QuantSpec, Wg: torch.Tensor, shrink=None) -> Encoded:
    return Encoded(*mxfp4_encode(Wg, shrink), None)


def decode_e2m1(spec: QuantSpec, enc: Encoded) -> torch.Tensor:
    """fp4_e2m1 and mxfp4: E2M1 value * block scale."""
    return scaled_decode(enc.codes, enc.scales, E2M1)


def encode_nvfp4(spec: QuantSpec, Wg: torch.Tensor, shrink=None) -> Encoded:
    codes, scales, ts = nvfp4_encode(Wg, shrink)
    return Encoded(codes, scales, None, ts)


def decode_nvfp4(spec: QuantSpec, enc: Encoded) -> torch.Tensor:
    return scaled_decode(enc.codes, enc.scales, E2M1) * enc.tensor_scale


def encode_nf4(spec: QuantSpec, Wg: torch.Tensor, shrink=None) -> Encoded:
    return Encoded(*nf4_encode(Wg, shrink), None)


def decode_nf4(spec: QuantSpec, enc: Encoded) -> torch.Tensor:
    return nf4_decode(enc.codes, enc.scales)
