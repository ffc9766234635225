"""KV-cache specs: how an attention layer's cached keys and values are stored, and their quantizers.

Grammar (a plan's `k` / `v`, top level or in a rule; "none" keeps the cache in high precision):

    {format}_{axis}[_g{G}][_r{R}][_sym][_had][_pre]

    format  int2..int8 (integer codes, asymmetric by default: x̂ = code * scale + min with scale =
            (max - min) / (2^b - 1), both fp16, as KIVI stores them) or fp8_e4m3 (E4M3 value times one
            fp16 scale, symmetric)
    axis    tok  per token (KIVI's values): one scale (and zero) per token, head and group of G channels
                 along the head dimension (default G = the head dimension: one per token and head)
            ch   per channel (KIVI's keys): one scale (and zero) per channel, head and group of G tokens
                 along the sequence (default G = 32); groups are aligned to position 0
    _r{R}   residual window: the R most recent tokens stay in high precision (bf16)
    _sym    integer formats: symmetric codes in [-2^(b-1), 2^(b-1) - 1], scale = absmax / (2^(b-1) - 1)
    _had    keys only: a Hadamard rotation of the head dimension before quantizing (QuaRot / RotateKV); the
            queries get the same rotation, so q . k is unchanged before quantization
    _pre    keys only: quantize the keys before RoPE (KVQuant), RoPE is applied to the dequantized keys;
            the default stores post-RoPE keys

Examples: `int4_ch_r32` (KIVI keys), `int4_tok_r32` (KIVI values), `int8_tok`, `fp8_e4m3_tok`,
`int4_ch_g64_had_pre`.

When a token is quantized (what the runtime stores and what the simulation reproduces). After n tokens
have been written, the first `quantized_prefix(n)` positions are held as codes and the rest in bf16:
    tok   max(n - R, 0): a token is quantized as soon as it leaves the R-token window
    ch    floor(max(n - R, 0) / G) * G: a group of G tokens is quantized once all of its tokens have left the
          R-token window; the tokens of the group not yet full stay in bf16 with the window, so between R
          and R + G - 1 tokens are in high precision (R = 0 still keeps the incomplete group)
Every later query attends to the dequantized codes of the quantized prefix (quantization happens once,
when written; the scales of a per-channel group come from its G tokens, the scales of a token from itself).

Bytes per token (`cache_bytes`): codes b/8 bytes per element, each scale and minimum fp16 (2 bytes);
window tokens bf16 (2 bytes per element). Paper links: KIVI https://arxiv.org/abs/2402.02750, KVQuant
https://arxiv.org/abs/2401.18079, QuaRot https://arxiv.org/abs/2404.00456.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError

_KV_RE = re.compile(
    r"^(?P<fmt>int[2-8]|fp8_e4m3)_(?P<axis>tok|ch)(?:_g(?P<G>\d+))?(?:_r(?P<R>\d+))?"
    r"(?P<sym>_sym)?(?P<had>_had)?(?P<pre>_pre)?$"
)
_EPS = 2.0**-24  # the smallest fp16 subnormal: a scale is stored in fp16
DEFAULT_TOKEN_GROUP = 32  # per-channel specs: tokens per scale group when `_g` is not given (KIVI)


def int_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, minimum) of every row of x [..., G], both rounded to fp16 as stored (minimum None: sym)."""
    if sym:
        scale = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        return scale.clamp_min(_EPS).half().float(), None
    lo = x.amin(-1, keepdim=True).half().float()
    scale = (x.amax(-1, keepdim=True) - lo) / (2**bits - 1)
    return scale.clamp_min(_EPS).half().float(), lo


def int_codes(x: torch.Tensor, bits: int, scale: torch.Tensor, lo: torch.Tensor | None) -> torch.Tensor:
    """Unsigned codes in [0, 2^b - 1] (float32) of x by `int_params`; sym codes are offset by 2^(b-1)."""
    if lo is None:
        half = 2 ** (bits - 1)
        return torch.clamp(torch.round(x / scale), -half, half - 1) + half
    return torch.clamp(torch.round((x - lo) / scale), 0, 2**bits - 1)


def int_dequant(codes: torch.Tensor, bits: int, scale: torch.Tensor, lo: torch.Tensor | None) -> torch.Tensor:
    """x̂ = code * scale + minimum (asym), (code - 2^(b-1)) * scale (sym); float32."""
    if lo is None:
        return (codes - 2 ** (bits - 1)) * scale
    return codes * scale + lo


def _int_qdq(x: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Integer quantize-dequantize of every row of x [..., G] (float32), exactly as the runtime stores it."""
    scale, lo = int_params(x, bits, sym)
    return int_dequant(int_codes(x, bits, scale, lo), bits, scale, lo)


def _fp8_qdq(x: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """E4M3 quantize-dequantize of every row of x [..., G]: absmax maps to 448 (fp16 scale)."""
    scale = (x.abs().amax(-1, keepdim=True) / 448.0).clamp_min(_EPS).half().float()
    return (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale


@dataclass(frozen=True)
class KVFormat:
    """One cache format: name, code bits, whether it has a zero point option, its row-wise qdq."""

    name: str
    bits: int
    symmetric_only: bool
    qdq: Callable[[torch.Tensor, int, bool], torch.Tensor]


KV_FORMATS: dict[str, KVFormat] = {
    **{f"int{b}": KVFormat(f"int{b}", b, False, _int_qdq) for b in range(2, 9)},
    "fp8_e4m3": KVFormat("fp8_e4m3", 8, True, _fp8_qdq),
}


@dataclass(frozen=True)
class KVSpec:
    """A parsed cache spec (module docstring). group_size None: the axis default (head dim / 32 tokens)."""

    fmt: str
    axis: str  # "tok" | "ch"
    group_size: int | None = None
    residual: int = 0
    sym: bool = False
    hadamard: bool = False
    pre_rope: bool = False

    @classmethod
    def parse(cls, s: str | KVSpec) -> KVSpec:
        """Parse a cache spec string; raises WorkbenchError naming the string and the grammar."""
        if isinstance(s, KVSpec):
            return s
        m = _KV_RE.match(s.strip()) if isinstance(s, str) else None
        if m is None:
            raise WorkbenchError(
                f"unknown KV-cache spec {s!r} (expected {{int2..int8|fp8_e4m3}}_{{tok|ch}}[_g<G>][_r<R>]"
                "[_sym][_had][_pre], e.g. int4_ch_r32, int4_tok_r32, int8_tok, fp8_e4m3_tok; or none)"
            )
        fmt = KV_FORMATS[m["fmt"]]
        G = int(m["G"]) if m["G"] else None
        if G is not None and not 1 <= G <= 4096:
            raise WorkbenchError(f"KV-cache spec {s!r}: group size {G} outside 1..4096")
        return cls(
            fmt.name,
            m["axis"],
            G,
            int(m["R"] or 0),
            fmt.symmetric_only or bool(m["sym"]),
            bool(m["had"]),
            bool(m["pre"]),
        )

    def __str__(self) -> str:
        g = f"_g{self.group_size}" if self.group_size is not None else ""
        r = f"_r{self.residual}" if self.residual else ""
        sym = "_sym" if self.sym and not KV_FORMATS[self.fmt].symmetric_only else ""
        tail = ("_had" if self.hadamard else "") + ("_pre" if self.pre_rope else "")
        return f"{self.fmt}_{self.axis}{g}{r}{sym}{tail}"

    @property
    def bits(self) -> int:
        return KV_FORMATS[self.fmt].bits

    @property
    def has_zero(self) -> bool:
        return not self.sym

    def group(self, head_dim: int) -> int:
        """Elements per scale: channels of a token (tok) or tokens of a channel (ch)."""
        if self.group_size is not None:
            return self.group_size
        return head_dim if self.axis == "tok" else DEFAULT_TOKEN_GROUP

    def check(self, head_dim: int, side: str) -> str | None:
        """Why this spec cannot store the `side` ('k' or 'v') cache of a head of `head_dim` (None: it can)."""
        if side == "v" and (self.hadamard or self.pre_rope):
            return "_had and _pre apply to keys only"
        if self.axis == "tok" and head_dim % self.group(head_dim):
            return f"group size {self.group(head_dim)} does not divide the head dimension {head_dim}"
        if self.hadamard and head_dim & (head_dim - 1):
            return f"_had needs a power-of-two head dimension, got {head_dim}"
        return None

    def quantized_prefix(self, n: int, head_dim: int) -> int:
        """How many of the first n written tokens are held as codes (module docstring)."""
        m = max(n - self.residual, 0)
        if self.axis == "ch":
            G = self.group(head_dim)
            return m // G * G
        return m

    def cache_bytes(self, n: int, head_dim: int, n_heads: int = 1) -> int:
        """Exact bytes of one side of a layer's cache after n tokens: codes, fp16 scales/zeros, bf16 rest."""
        q = self.quantized_prefix(n, head_dim)
        G = self.group(head_dim)
        n_scales = q * (head_dim // G) if self.axis == "tok" else (q // G) * head_dim
        scale_bytes = n_scales * 2 * (2 if self.has_zero else 1)
        code_bytes = math.ceil(q * head_dim * self.bits / 8)
        return n_heads * (code_bytes + scale_bytes + (n - q) * head_dim * 2)


def kv_spec_string(
    fmt: str, axis: str, residual: int = 0, hadamard: bool = False, pre_rope: bool = False
) -> str:
    """The canonical spec string of its parts ('none' when fmt is 'none'); raises on an invalid spec."""
    if fmt == "none":
        return "none"
    r = f"_r{residual}" if residual else ""
    return str(KVSpec.parse(f"{fmt}_{axis}{r}{'_had' if hadamard else ''}{'_pre' if pre_rope else ''}"))


def parse_kv(s: str | KVSpec | None) -> KVSpec | None:
    """A cache spec, or None for 'none' / None (kept in high precision)."""
    return None if s is None or s == "none" else KVSpec.parse(s)


def kv_bytes(spec: KVSpec | str | None, n: int, head_dim: int, n_heads: int = 1) -> int:
    """Bytes of one side (K or V) of one layer's cache after n tokens; None: the bf16 cache."""
    spec = parse_kv(spec) if not isinstance(spec, KVSpec) else spec
    return n * head_dim * 2 * n_heads if spec is None else spec.cache_bytes(n, head_dim, n_heads)


def hadamard_matrix(head_dim: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard H / sqrt(d) [d, d] (float32) the `_had` keys are rotated by."""
    from workbench.quant.hadamard import sylvester

    return (sylvester(head_dim) / math.sqrt(head_dim)).float()


def fake_quant_kv(x: torch.Tensor, spec: KVSpec | str) -> torch.Tensor:
    """Quantize-dequantize a whole cache x [B, H, T, D] as the runtime stores it once every token is written.

    tok: each token's row (groups of G channels); ch: each channel over aligned groups of G tokens (a last,
    incomplete group is quantized by its own rows here; `quantized_prefix` says which tokens the runtime
    actually holds as codes). The `_had` rotation is NOT applied here (the caller rotates). Returns float32.
    """
    spec = KVSpec.parse(spec)
    B, H, T, D = x.shape
    reason = spec.check(D, "k")
    if reason:
        raise WorkbenchError(f"KV-cache spec {spec}: {reason}")
    qdq = KV_FORMATS[spec.fmt].qdq
    x = x.float()
    G = spec.group(D)
    if spec.axis == "tok":
        return qdq(x.reshape(B, H, T, D // G, G), spec.bits, spec.sym).reshape(B, H, T, D)
    n_full = T // G * G
    out = torch.empty_like(x)
    if n_full:
        xg = x[:, :, :n_full].reshape(B, H, n_full // G, G, D).transpose(-1, -2)  # [B, H, T/G, D, G]
        out[:, :, :n_full] = qdq(xg, spec.bits, spec.sym).transpose(-1, -2).reshape(B, H, n_full, D)
    if n_full < T:
        out[:, :, n_full:] = qdq(x[:, :, n_full:].transpose(-1, -2), spec.bits, spec.sym).transpose(-1, -2)
    return out
