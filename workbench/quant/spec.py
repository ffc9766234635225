"""QuantSpec: the one-line description of how a layer is stored (format, granularity, algorithm).

Grammar (see docs/DESIGN.md), parts joined by `_`, then an optional `:algo`:

    bf16 | fp16                                   leave the layer in high precision
    int{b}_(g{G} | ch | t)[_sym | _asym]          b in 2..8, G in 16..256, default asym
    fp8_e4m3 | fp8_e5m2 [_ch | _t]                 fp32 scale per output channel (default) or per tensor
    fp4_e2m1_g{G}                                  E2M1 elements, fp16 scale per group of G
    mxfp4                                          E2M1, block 32, E8M0 (power-of-two) scale  (OCP MX v1.0)
    nvfp4                                          E2M1, block 16, E4M3 scale + one fp32 tensor scale
    nf4_g{G}                                       16 NormalFloat levels (QLoRA), fp16 absmax per block
    ...:rtn | :gptq | :awq                         algorithm, default rtn; gptq/awq only for int specs

Everything format-specific (bits, granularities, fixed blocks, metadata sizes) is read from the format
registry (registry.py); this module holds the grammar and the arithmetic.
`str(QuantSpec.parse(s))` is the canonical string (defaults dropped: `int4_g128_asym:rtn` -> `int4_g128`)
and `QuantSpec.parse(str(q)) == q`.

Storage accounting (exact, metadata included; groups run along the input features K from column 0 and the
last group is shorter when G does not divide K; it still carries a full set of metadata):
    int       b bits per code (3-bit codes count 3 bits: packing uses a 2-bit + 1-bit plane layout),
              fp16 scale per group/channel/tensor, plus an fp16 zero point when asymmetric
    fp8       8 bits per code, fp32 scale per channel (or one per tensor)
    fp4_e2m1  4 bits per code, fp16 scale per group
    mxfp4     4 bits per code, 8-bit E8M0 scale per block of 32
    nvfp4     4 bits per code, 8-bit E4M3 scale per block of 16, one fp32 tensor scale
    nf4       4 bits per code, fp16 absmax per group
    awq       + one fp16 runtime input scale per input channel (kept unfolded, see awq.py)
(the registry's `scale_bits`, `zero_bits`, `tensor_scale_bits` of each format).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from workbench.errors import WorkbenchError
from workbench.quant.registry import ALGOS, FORMATS, GRANULARITIES, GRANULARITY_PART, Format, format_of

MIN_BITS, MAX_BITS = 2, 8  # integer code widths
MIN_GROUP, MAX_GROUP = 16, 256  # group sizes a spec accepts (the GPU kernels tile only 32..256, see qlinear)
AWQ_INPUT_SCALE_BITS = 16  # AWQ keeps one fp16 runtime scale per input channel (awq.py)

_GROUP_RE = re.compile(r"g(\d+)")


def _format_list() -> str:
    """The formats as a user types them, for error messages."""
    out = []
    for f in FORMATS.values():
        if f.code_bits is None:
            out.append(f"{f.name}{MIN_BITS}..{f.name}{MAX_BITS}")
        else:
            out.append(f.name if f.default_granularity else f"{f.name}_g{{G}}")
    return ", ".join(out)


def _granularity_options(f: Format) -> str:
    """'_g{G} (G in 16..256), _ch or _t' for the granularities of `f`."""
    parts = [
        GRANULARITY_PART[g] + (f" (G in {MIN_GROUP}..{MAX_GROUP})" if g == "group" else "")
        for g in f.granularities
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


@dataclass(frozen=True)
class QuantSpec:
    """A validated quantization spec. Build it with `QuantSpec.parse("int4_g128")`.

    Attributes:
        fmt: a format name of the registry (`workbench.quant.registry.FORMATS`).
        bits: bits per stored code (16 for bf16/fp16).
        granularity: "group" | "channel" | "tensor" | "none" (bf16/fp16).
        group_size: input channels per group for "group", else None.
        symmetric: True for symmetric integers and for every float format.
        algo: "rtn" | "gptq" | "awq".
    """

    fmt: str
    bits: int
    granularity: str
    group_size: int | None
    symmetric: bool
    algo: str = "rtn"

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise WorkbenchError(
                f"invalid QuantSpec({self.fmt!r}, bits={self.bits}, {self.granularity}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, "
                f"algo={self.algo!r}): {problem}"
            )

    def _problem(self) -> str | None:
        """Why these fields do not describe a valid spec, or None."""
        f = FORMATS.get(self.fmt)
        if f is None:
            return f"unknown format {self.fmt!r}"
        if self.algo not in ALGOS:
            return f"unknown algorithm {self.algo!r}"
        if self.granularity not in GRANULARITIES:
            return f"unknown granularity {self.granularity!r}"
        if self.algo not in f.algos:
            return f"algorithm {self.algo!r} applies to {_algo_formats(self.algo)} specs only"
        if (self.granularity == "group") != (self.group_size is not None):
            return "group_size is set exactly when granularity is 'group'"
        if f.code_bits is None and not MIN_BITS <= self.bits <= MAX_BITS:
            return f"bits {self.bits} outside {MIN_BITS}..{MAX_BITS}"
        if f.code_bits is not None and self.bits != f.code_bits:
            return f"{f.name} has {f.code_bits} bits"
        if f.symmetric_only and not self.symmetric:
            return f"{f.name} is symmetric"
        if self.granularity not in f.granularities:
            return f"{f.name} does not support granularity {self.granularity!r}"
        if f.fixed_block is not None and self.group_size != f.fixed_block:
            return f"{f.name} has a fixed block of {f.fixed_block}"
        if (
            f.fixed_block is None
            and self.group_size is not None
            and not (MIN_GROUP <= self.group_size <= MAX_GROUP)
        ):
            return f"group size {self.group_size} outside {MIN_GROUP}..{MAX_GROUP}"
        return None

    # ------------------------------------------------------------------ parsing and printing
    @staticmethod
    def parse(s: str | QuantSpec) -> QuantSpec:
        """Parse a spec string; raise WorkbenchError naming the bad part."""
        if isinstance(s, QuantSpec):
            return s
        if not isinstance(s, str) or not s.strip():
            raise WorkbenchError(f"empty or non-string quantization spec {s!r}")
        text = s.strip()
        head, sep, algo = text.partition(":")
        algo = algo.strip().lower() if sep else "rtn"
        if sep and algo not in ALGOS:
            raise WorkbenchError(f"unknown algorithm '{algo}' in spec '{text}' (choose rtn, gptq or awq)")
        parts = head.strip().lower().split("_")
        if any(p == "" for p in parts):
            raise WorkbenchError(f"empty part in spec '{text}'")
        f, bits = _parse_format(parts, text)
        granularity, group, symmetric, gran_part = _parse_options(parts, text)
        granularity, group = _settle_granularity(f, granularity, group, gran_part, text)
        if f.symmetric_only:
            if symmetric is False:
                raise WorkbenchError(
                    f"part 'asym' does not apply to {f.name} in spec '{text}' (float formats are symmetric)"
                )
            symmetric = True
        if granularity == "group" and f.fixed_block is None and not MIN_GROUP <= group <= MAX_GROUP:
            raise WorkbenchError(f"group size {group} outside {MIN_GROUP}..{MAX_GROUP} in '{text}'")
        if algo not in f.algos:
            raise WorkbenchError(
                f"algorithm '{algo}' applies to {_algo_formats(algo)} specs only, not {f.name} in '{text}'"
            )
        return QuantSpec(f.name, bits, granularity, group, bool(symmetric), algo)

    def __str__(self) -> str:
        f = format_of(self)
        s = f"{f.name}{self.bits}" if f.code_bits is None else f.name
        if f.fixed_block is None and self.granularity != f.default_granularity:
            s += GRANULARITY_PART[self.granularity].replace("{G}", str(self.group_size))
        if not f.symmetric_only and self.symmetric:
            s += "_sym"
        return s if self.algo == "rtn" else f"{s}:{self.algo}"

    # ------------------------------------------------------------------ properties
    @property
    def format(self) -> Format:
        """The registry entry of this spec's format (encode, decode, layout, kernel, accounting)."""
        return format_of(self)

    @property
    def is_quantized(self) -> bool:
        """False for bf16/fp16 (the layer stays in high precision)."""
        return format_of(self).is_quantized

    @property
    def is_int(self) -> bool:
        return self.fmt == "int"

    @property
    def needs_gram(self) -> bool:
        """True when the algorithm reads calibration statistics (the Gram matrix X^T X): gptq, awq."""
        return self.algo in ("gptq", "awq")

    def n_groups(self, in_features: int) -> int:
        """Scale groups per output row ([N, n_groups] scales); 1 for channel, 1 for tensor."""
        if self.granularity == "group":
            return math.ceil(in_features / self.group_size)
        return 1

    # ------------------------------------------------------------------ storage accounting
    # Every shape argument below is (out_features, in_features), the order of the weight [N, K].
    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact storage of an [out, in] weight in bits: codes + scales + zeros + tensor/input scales."""
        f = format_of(self)
        n, k = int(out_features), int(in_features)
        per_scale = f.scale_bits + (0 if self.symmetric else f.zero_bits)
        n_scales = {"group": n * self.n_groups(k), "channel": n, "tensor": 1, "none": 0}[self.granularity]
        extra = f.tensor_scale_bits + (AWQ_INPUT_SCALE_BITS * k if self.algo == "awq" else 0)
        return self.bits * n * k + per_scale * n_scales + extra

    def bits_per_weight(self, *, out_features: int, in_features: int) -> float:
        """Exact average storage bits per weight of an [out, in] layer, metadata included.

        Keyword-only: an older signature took (in, out) positionally, the reverse of `storage_bits`.
        """
        return self.storage_bits(out_features, in_features) / (int(out_features) * int(in_features))

    def storage_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of an [out, in] layer: ceil(storage_bits / 8)."""
        return -(-self.storage_bits(out_features, in_features) // 8)

    def check_layer(self, out_features: int, in_features: int) -> str | None:
        """Reason this spec cannot apply to an [out, in] weight, or None.

        Every spec applies to every non-empty layer: a group size that does not divide `in_features`
        gives a shorter last group (counted exactly in `storage_bits`), and a group larger than the
        layer is one short group. Only empty shapes and shapes whose codes would not fit int64 indexing
        are refused.
        """
        n, k = int(out_features), int(in_features)
        if n <= 0 or k <= 0:
            return f"empty weight shape [{n}, {k}]"
        if n * k >= 2**62:
            return f"weight shape [{n}, {k}] is too large"
        return None


# ------------------------------------------------------------------------------------------- parsing helpers
def _algo_formats(algo: str) -> str:
    """The formats an algorithm applies to ('int')."""
    return ", ".join(f.name for f in FORMATS.values() if algo in f.algos)


def _parse_format(parts: list[str], text: str) -> tuple[Format, int]:
    """Pop the format words from `parts` ('int4', 'nf4', 'fp8' 'e4m3'): (format, code bits)."""
    first = parts.pop(0)
    two_word = {f.family for f in FORMATS.values() if f.family != f.name}  # fp8_e4m3, fp4_e2m1, ...
    if first in two_word:
        sub = parts.pop(0) if parts else ""
        if f"{first}_{sub}" not in FORMATS:
            subs = [
                f.name.split("_", 1)[1] for f in FORMATS.values() if f.family == first and f.name != first
            ]
            raise WorkbenchError(
                f"unknown part '{sub or '(missing)'}' in spec '{text}' (expected {' or '.join(subs)})"
            )
        f = FORMATS[f"{first}_{sub}"]
        return f, f.code_bits
    for f in FORMATS.values():
        m = re.fullmatch(rf"{f.name}(\d+)", first) if f.code_bits is None else None
        if m:
            bits = int(m.group(1))
            if not MIN_BITS <= bits <= MAX_BITS:
                raise WorkbenchError(f"bits {bits} outside {MIN_BITS}..{MAX_BITS} in '{text}'")
            return f, bits
    if first in FORMATS and FORMATS[first].code_bits is not None:
        return FORMATS[first], FORMATS[first].code_bits
    raise WorkbenchError(f"unknown part '{first}' in spec '{text}' (formats: {_format_list()})")


def _parse_options(parts: list[str], text: str) -> tuple[str | None, int | None, bool | None, str]:
    """Granularity and symmetry words: (granularity, group size, symmetric, the granularity word)."""
    granularity: str | None = None
    gran_part = ""
    group: int | None = None
    symmetric: bool | None = None
    for p in parts:
        gm = _GROUP_RE.fullmatch(p)
        if gm or p in ("ch", "t"):
            if granularity is not None:
                raise WorkbenchError(f"second granularity '{p}' in spec '{text}'")
            gran_part = p
            if gm:
                granularity, group = "group", int(gm.group(1))
            else:
                granularity = "channel" if p == "ch" else "tensor"
        elif p in ("sym", "asym"):
            if symmetric is not None:
                raise WorkbenchError(f"second symmetry part '{p}' in spec '{text}'")
            symmetric = p == "sym"
        else:
            raise WorkbenchError(f"unknown part '{p}' in spec '{text}'")
    return granularity, group, symmetric, gran_part


def _settle_granularity(
    f: Format, granularity: str | None, group: int | None, gran_part: str, text: str
) -> tuple[str, int | None]:
    """The granularity and group of a spec of format `f`: the one written, the default or the fixed block."""
    if f.fixed_block is not None:
        if granularity is not None:
            raise WorkbenchError(
                f"{f.name} has a fixed block of {f.fixed_block}; remove '{gran_part}' from spec '{text}'"
            )
        return "group", f.fixed_block
    if granularity is None and f.default_granularity is not None:
        return f.default_granularity, None
    if granularity is None and len(f.granularities) > 1:
        raise WorkbenchError(f"spec '{text}' needs a granularity: {_granularity_options(f)}")
    if granularity is None or (granularity not in f.granularities and f.granularities == ("group",)):
        raise WorkbenchError(f"spec '{text}' needs a group size, e.g. '{f.name}_g64'")
    if granularity not in f.granularities:
        if f.granularities == ("none",):
            raise WorkbenchError(f"part '{gran_part}' does not apply to {f.name} in spec '{text}'")
        raise WorkbenchError(
            f"part '{gran_part}' does not apply to {f.name} in spec '{text}' (use {_granularity_options(f)})"
        )
    return granularity, group
