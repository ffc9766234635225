"""Activation specs: how a linear layer's *input* is quantized, and its simulation on the CPU.

Grammar (a plan rule's `act`, beside its weight `spec`):

    {format}_{granularity}[_sym|_asym][_clip{r}]      or  "none" (the input stays in high precision)

    format       int8, int4 (integer codes, any of int2..int8), fp8_e4m3 (E4M3 value, max 448; always
                 symmetric: one scale, no zero point)
    granularity  tok    one scale (and zero point) per token: the row of x [..., K]
                 g{G}   one per group of G consecutive input channels of a token (G divides K)
    _sym/_asym   integer formats: symmetric (scale = absmax / (2^(b-1) - 1), codes in [-2^(b-1), 2^(b-1)-1])
                 or asymmetric (default: scale = (max - min) / (2^b - 1), zero = round(-min / scale),
                 codes in [0, 2^b - 1])
    _clip{r}     clip ratio r in (0, 1]: the range (absmax, or min and max) is multiplied by r before the
                 scale is taken, so the largest values saturate (QuaRot uses 0.9 for activations)

Examples: `int8_tok`, `int8_tok_sym`, `fp8_e4m3_tok`, `int4_tok_clip0.9`, `int4_g128_sym`.

Formats are entries of `ACT_FORMATS` (the activation side of quant/registry.py's format registry): a new one
is one `ActFormat` with its quantize-dequantize function. `fake_quant_act(x, spec)` is the simulated
quantizer: x [..., K] -> the dequantized x̂ of the same shape and dtype (float32 math). Dynamic quantization:
every scale comes from the token being quantized, as W8A8 kernels do at run time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError

_ACT_RE = re.compile(
    r"^(?P<fmt>int[2-8]|fp8_e4m3)_(?P<gran>tok|g(?P<G>\d+))(?:_(?P<sym>sym|asym))?(?:_clip(?P<clip>[0-9.]+))?$"
)
_EPS = 1e-12


def _int_qdq(xg: torch.Tensor, bits: int, sym: bool, clip: float) -> torch.Tensor:
    """Integer quantize-dequantize of every row of xg [..., G] (float32) with its own scale (and zero)."""
    if sym:
        qmax = 2 ** (bits - 1) - 1
        scale = (xg.abs().amax(-1, keepdim=True) * clip / qmax).clamp_min(_EPS)
        return torch.clamp(torch.round(xg / scale), -qmax - 1, qmax) * scale
    qmax = 2**bits - 1
    lo = (xg.amin(-1, keepdim=True) * clip).clamp(max=0.0)
    hi = (xg.amax(-1, keepdim=True) * clip).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp_min(_EPS)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(xg / scale) + zero, 0, qmax) - zero) * scale


def _fp8_qdq(xg: torch.Tensor, bits: int, sym: bool, clip: float) -> torch.Tensor:
    """E4M3 quantize-dequantize of every row of xg [..., G] (absmax * clip maps to 448, larger saturate)."""
    scale = (xg.abs().amax(-1, keepdim=True) * clip / 448.0).clamp_min(_EPS)
    y = (xg / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    return y * scale


@dataclass(frozen=True)
class ActFormat:
    """One activation format: its name, code bits and its row-wise quantize-dequantize function."""

    name: str
    bits: int
    symmetric_only: bool
    qdq: Callable[[torch.Tensor, int, bool, float], torch.Tensor]


ACT_FORMATS: dict[str, ActFormat] = {
    **{f"int{b}": ActFormat(f"int{b}", b, False, _int_qdq) for b in range(2, 9)},
    "fp8_e4m3": ActFormat("fp8_e4m3", 8, True, _fp8_qdq),
}


@dataclass(frozen=True)
class ActSpec:
    """A parsed activation spec (module docstring). group_size None: per token."""

    fmt: str
    group_size: int | None = None
    sym: bool = False
    clip: float = 1.0

    @classmethod
    def parse(cls, s: str | ActSpec) -> ActSpec:
        """Parse an activation spec string; raises WorkbenchError naming the string and the grammar."""
        if isinstance(s, ActSpec):
            return s
        m = _ACT_RE.match(s.strip()) if isinstance(s, str) else None
        if m is None:
            raise WorkbenchError(
                f"unknown activation spec {s!r} (expected e.g. int8_tok, int8_tok_sym, fp8_e4m3_tok, "
                "int4_tok_clip0.9, int4_g128; or none)"
            )
        fmt = ACT_FORMATS[m["fmt"]]
        G = int(m["G"]) if m["G"] else None
        if G is not None and not 8 <= G <= 4096:
            raise WorkbenchError(f"activation spec {s!r}: group size {G} outside 8..4096")
        try:
            clip = float(m["clip"]) if m["clip"] else 1.0
        except ValueError:
            clip = -1.0
        if not 0.0 < clip <= 1.0:
            raise WorkbenchError(f"activation spec {s!r}: clip ratio must be in (0, 1], got {m['clip']}")
        if fmt.symmetric_only and m["sym"] == "asym":
            raise WorkbenchError(f"activation spec {s!r}: {fmt.name} is symmetric only (no zero point)")
        return cls(fmt.name, G, fmt.symmetric_only or m["sym"] == "sym", clip)

    def __str__(self) -> str:
        gran = "tok" if self.group_size is None else f"g{self.group_size}"
        sym = "_sym" if self.sym and not ACT_FORMATS[self.fmt].symmetric_only else ""
        clip = f"_clip{self.clip:g}" if self.clip != 1.0 else ""
        return f"{self.fmt}_{gran}{sym}{clip}"

    @property
    def bits(self) -> int:
        return ACT_FORMATS[self.fmt].bits

    def check_layer(self, in_features: int) -> str | None:
        """Why this spec cannot quantize the input of a layer with `in_features` channels (None: it can)."""
        if self.group_size is not None and in_features % self.group_size:
            return f"group size {self.group_size} does not divide the layer's {in_features} input channels"
        return None


def parse_act(s: str | None) -> ActSpec | None:
    """An activation spec, or None for 'none' / None (input kept in high precision)."""
    return None if s is None or s == "none" else ActSpec.parse(s)


def fake_quant_act(x: torch.Tensor, spec: ActSpec | str) -> torch.Tensor:
    """Quantize-dequantize activations x [..., K] by `spec`, per token (or per group of a token).

    Returns x̂ [..., K] in x's dtype (float32 math). Raises WorkbenchError when the group does not divide K.
    """
    spec = ActSpec.parse(spec)
    K = x.shape[-1]
    reason = spec.check_layer(K)
    if reason:
        raise WorkbenchError(f"activation spec {spec}: {reason}")
    G = spec.group_size or K
    xg = x.float().reshape(*x.shape[:-1], K // G, G)
    y = ACT_FORMATS[spec.fmt].qdq(xg, spec.bits, spec.sym, spec.clip)
    return y.reshape(x.shape).to(x.dtype)
