"""Quantization primitives: grouping along K, integer formats, and one encode/decode entry for every format.

Everything here is a pure function on tensors. Weights are [N=out, K=in]. A spec's granularity turns W into
a grouped view `Wg` of shape [R, n_groups, G] that every format works on:
    group   [N, ceil(K/G), G]   zero-padded at the end of K (the last group is shorter)
    channel [N, 1, K]
    tensor  [1, 1, N*K]
Padding with zeros is harmless: integer ranges always include 0 and float formats use absmax.

Integer codes (https://arxiv.org/abs/2210.17323 conventions): uint8 codes in 0..2^b-1 and
    W_hat = (codes - zeros) * scales
asymmetric: scale = (max - min) / (2^b - 1) over a range that includes 0, zero = round(-min / scale) stored
as an fp16 integer value; symmetric: scale = 2 * absmax / (2^b - 1), fixed zero 2^(b-1) (not stored).
Scales are rounded to fp16 before the codes are computed, so `W_hat` is exactly what a kernel reading fp16
scales reproduces. Stored scales are float32 tensors whose values are exact in the storage type.

The float formats (fp8, fp4_e2m1, mxfp4, nvfp4, nf4) live in formats_float.py; `encode` / `decode` of any
spec dispatch through the format registry (registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from workbench.quant.spec import QuantSpec

FP16_MIN_SUBNORMAL = 2.0**-24
FP16_MAX = 65504.0


@dataclass
class Encoded:
    """Codes and metadata of a grouped weight.

    codes: uint8 [R, n_groups, G]; scales: float32 [R, n_groups]; zeros: float32 [R, n_groups] or None
    (symmetric / float formats); tensor_scale: float32 [] (nvfp4) or None.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    tensor_scale: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- grouping
def to_groups(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, ceil(K/G), G], zero-padding the last group."""
    N, K = W.shape
    ng = -(-K // group_size)
    pad = ng * group_size - K
    if pad:
        W = torch.nn.functional.pad(W, (0, pad))
    return W.reshape(N, ng, group_size)


def grouped(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[N, K] -> the grouped view [R, n_groups, G] of `spec`'s granularity (see module docstring)."""
    if spec.granularity == "group":
        return to_groups(W, spec.group_size)
    if spec.granularity == "channel":
        return W.unsqueeze(1)
    if spec.granularity == "tensor":
        return W.reshape(1, 1, -1)
    raise AssertionError(f"spec {spec} has no grouped view")


def ungrouped(Wg: torch.Tensor, spec: QuantSpec, N: int, K: int) -> torch.Tensor:
    """Inverse of `grouped`: [R, n_groups, G] -> [N, K] (drops padding)."""
    if spec.granularity == "tensor":
        return Wg.reshape(N, K)
    return Wg.reshape(N, -1)[:, :K]


def expand_groups(P: torch.Tensor, spec: QuantSpec, N: int, K: int) -> torch.Tensor:
    """Per-group parameter [N or 1, n_groups] -> per-weight [N, K] (for code paths that work column-wise)."""
    if spec.granularity == "group":
        return P.repeat_interleave(spec.group_size, dim=1)[:, :K].expand(N, K)
    return P.expand(N, K)


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round positive scales to fp16 (kept as float32), clamped into fp16's positive range."""
    return x.clamp(FP16_MIN_SUBNORMAL, FP16_MAX).half().float()


# ---------------------------------------------------------------------------------------------- integers
def int_params(
    Wg: torch.Tensor, bits: int, symmetric: bool, shrink: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points of integer quantization over the last dim.

    Args:
        Wg: [..., G] float32 weights of each group.
        bits: code width, 2..8.
        symmetric: fixed zero 2^(bits-1) when True.
        shrink: optional factor in (0, 1] per group ([...]) or scalar that shrinks the range (clipping).
    Returns:
        scales [...] (fp16 values, float32 dtype) and zeros [...] (integer values) or None when symmetric.
    """
    maxq = 2**bits - 1
    xmin = Wg.amin(-1).clamp(max=0)
    xmax = Wg.amax(-1).clamp(min=0)
    if shrink is not None:
        xmin, xmax = xmin * shrink, xmax * shrink
    if symmetric:
        amax = torch.maximum(-xmin, xmax)
        scales = torch.where(amax > 0, 2 * amax / maxq, torch.ones_like(amax))
        return round_fp16(scales), None
    rng = xmax - xmin
    scales = round_fp16(torch.where(rng > 0, rng / maxq, torch.ones_like(rng)))
    zeros = torch.round(-xmin / scales).clamp(0, maxq)
    return scales, zeros


def int_zero(bits: int, symmetric: bool, zeros: torch.Tensor | None) -> torch.Tensor | float:
    """The zero point to use: the stored one, or the fixed 2^(bits-1) of symmetric specs."""
    if symmetric or zeros is None:
        return float(2 ** (bits - 1))
    return zeros


def int_encode(
    Wg: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | float, bits: int
) -> torch.Tensor:
    """Codes uint8 [..., G] = clamp(round(W / scale) + zero, 0, 2^b - 1); scales/zeros are [...]."""
    z = zeros.unsqueeze(-1) if isinstance(zeros, torch.Tensor) else zeros
    q = torch.round(Wg / scales.unsqueeze(-1)) + z
    return q.clamp_(0, 2**bits - 1).to(torch.uint8)


def int_decode(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | float) -> torch.Tensor:
    """W_hat [..., G] = (codes - zeros) * scales, float32."""
    z = zeros.unsqueeze(-1) if isinstance(zeros, torch.Tensor) else zeros
    return (codes.float() - z) * scales.unsqueeze(-1)


def encode_int(spec: QuantSpec, Wg: torch.Tensor, shrink: torch.Tensor | float | None = None) -> Encoded:
    """Integer codes of a grouped weight [R, n_groups, G] (the `int` entry of the format registry)."""
    scales, zeros = int_params(Wg, spec.bits, spec.symmetric, shrink)
    codes = int_encode(Wg, scales, int_zero(spec.bits, spec.symmetric, zeros), spec.bits)
    return Encoded(codes, scales, zeros)


def decode_int(spec: QuantSpec, enc: Encoded) -> torch.Tensor:
    """W_hat [R, n_groups, G] of integer codes (the `int` entry of the format registry)."""
    return int_decode(enc.codes, enc.scales, int_zero(spec.bits, spec.symmetric, enc.zeros))
