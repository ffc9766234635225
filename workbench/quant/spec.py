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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from workbench.errors import WorkbenchError

FORMATS = ("bf16", "fp16", "int", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "mxfp4", "nvfp4", "nf4")
ALGOS = ("rtn", "gptq", "awq")
GRANULARITIES = ("group", "channel", "tensor", "none")
MIN_BITS, MAX_BITS = 2, 8
MIN_GROUP, MAX_GROUP = 16, 256
FIXED_BLOCK = {"mxfp4": 32, "nvfp4": 16}

_INT_RE = re.compile(r"int(\d+)")
_GROUP_RE = re.compile(r"g(\d+)")


@dataclass(frozen=True)
class QuantSpec:
    """A validated quantization spec. Build it with `QuantSpec.parse("int4_g128")`.

    Attributes:
        fmt: one of FORMATS.
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
        f = self.fmt
        if f not in FORMATS:
            return f"unknown format {f!r}"
        if self.algo not in ALGOS:
            return f"unknown algorithm {self.algo!r}"
        if self.granularity not in GRANULARITIES:
            return f"unknown granularity {self.granularity!r}"
        if self.algo != "rtn" and f != "int":
            return f"algorithm {self.algo!r} applies to int specs only"
        if (self.granularity == "group") != (self.group_size is not None):
            return "group_size is set exactly when granularity is 'group'"
        expected = {"bf16": 16, "fp16": 16, "fp8_e4m3": 8, "fp8_e5m2": 8}.get(f, 4)
        if f == "int":
            if not MIN_BITS <= self.bits <= MAX_BITS:
                return f"bits {self.bits} outside {MIN_BITS}..{MAX_BITS}"
            if self.granularity == "none":
                return "int needs a granularity"
        else:
            if self.bits != expected:
                return f"{f} has {expected} bits"
            if not self.symmetric:
                return f"{f} is symmetric"
            allowed = {
                "bf16": ("none",),
                "fp16": ("none",),
                "fp8_e4m3": ("channel", "tensor"),
                "fp8_e5m2": ("channel", "tensor"),
            }.get(f, ("group",))
            if self.granularity not in allowed:
                return f"{f} does not support granularity {self.granularity!r}"
        if f in FIXED_BLOCK and self.group_size != FIXED_BLOCK[f]:
            return f"{f} has a fixed block of {FIXED_BLOCK[f]}"
        if (
            f not in FIXED_BLOCK
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
        parts = [p for p in head.strip().lower().split("_")]
        if any(p == "" for p in parts):
            raise WorkbenchError(f"empty part in spec '{text}'")
        first = parts.pop(0)
        if first in ("fp8", "fp4"):
            sub = parts.pop(0) if parts else ""
            fmt = f"{first}_{sub}"
            if fmt not in FORMATS:
                raise WorkbenchError(
                    f"unknown part '{sub or '(missing)'}' in spec '{text}' "
                    f"(expected {'e4m3 or e5m2' if first == 'fp8' else 'e2m1'})"
                )
            bits = 8 if first == "fp8" else 4
        elif m := _INT_RE.fullmatch(first):
            fmt, bits = "int", int(m.group(1))
            if not MIN_BITS <= bits <= MAX_BITS:
                raise WorkbenchError(f"bits {bits} outside {MIN_BITS}..{MAX_BITS} in '{text}'")
        elif first in ("bf16", "fp16"):
            fmt, bits = first, 16
        elif first in ("mxfp4", "nvfp4", "nf4"):
            fmt, bits = first, 4
        else:
            raise WorkbenchError(
                f"unknown part '{first}' in spec '{text}' (formats: bf16, fp16, int2..int8, "
                "fp8_e4m3, fp8_e5m2, fp4_e2m1_g{G}, mxfp4, nvfp4, nf4_g{G})"
            )

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

        if fmt == "int":
            if granularity is None:
                raise WorkbenchError(
                    f"spec '{text}' needs a granularity: _g{{G}} (G in {MIN_GROUP}..{MAX_GROUP}), _ch or _t"
                )
            symmetric = bool(symmetric)
        else:
            if symmetric is False:
                raise WorkbenchError(
                    f"part 'asym' does not apply to {fmt} in spec '{text}' (float formats are symmetric)"
                )
            symmetric = True
            if fmt in ("bf16", "fp16"):
                if granularity is not None:
                    raise WorkbenchError(f"part '{gran_part}' does not apply to {fmt} in spec '{text}'")
                granularity = "none"
            elif fmt.startswith("fp8"):
                if granularity == "group":
                    raise WorkbenchError(
                        f"part 'g{group}' does not apply to {fmt} in spec '{text}' (use _ch or _t)"
                    )
                granularity = granularity or "channel"
            elif fmt in FIXED_BLOCK:
                if granularity is not None:
                    raise WorkbenchError(
                        f"{fmt} has a fixed block of {FIXED_BLOCK[fmt]}; remove "
                        f"'{gran_part}' from spec '{text}'"
                    )
                granularity, group = "group", FIXED_BLOCK[fmt]
            elif granularity != "group":
                raise WorkbenchError(f"spec '{text}' needs a group size, e.g. '{fmt}_g64'")
        if granularity == "group" and fmt not in FIXED_BLOCK and not MIN_GROUP <= group <= MAX_GROUP:
            raise WorkbenchError(f"group size {group} outside {MIN_GROUP}..{MAX_GROUP} in '{text}'")
        if algo != "rtn" and fmt != "int":
            raise WorkbenchError(f"algorithm '{algo}' applies to int specs only, not {fmt} in '{text}'")
        return QuantSpec(fmt, bits, granularity, group, symmetric, algo)

    def __str__(self) -> str:
        if self.fmt in ("bf16", "fp16", "mxfp4", "nvfp4"):
            s = self.fmt
        elif self.fmt == "int":
            gran = {"group": f"g{self.group_size}", "channel": "ch", "tensor": "t"}[self.granularity]
            s = f"int{self.bits}_{gran}" + ("_sym" if self.symmetric else "")
        elif self.fmt.startswith("fp8"):
            s = self.fmt + ("_t" if self.granularity == "tensor" else "")
        else:
            s = f"{self.fmt}_g{self.group_size}"
        return s if self.algo == "rtn" else f"{s}:{self.algo}"

    # ------------------------------------------------------------------ properties
    @property
    def is_quantized(self) -> bool:
        """False for bf16/fp16 (the layer stays in high precision)."""
        return self.fmt not in ("bf16", "fp16")

    @property
    def is_int(self) -> bool:
        return self.fmt == "int"

    def n_groups(self, in_features: int) -> int:
        """Scale groups per output row ([N, n_groups] scales); 1 for channel, 1 for tensor."""
        if self.granularity == "group":
            return math.ceil(in_features / self.group_size)
        return 1

    # ------------------------------------------------------------------ storage accounting
    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact storage of an [out, in] weight in bits: codes + scales + zeros + tensor/input scales."""
        n, k = int(out_features), int(in_features)
        if self.fmt in ("bf16", "fp16"):
            return 16 * n * k
        codes = self.bits * n * k
        if self.fmt == "int":
            per_scale = 16 + (0 if self.symmetric else 16)  # fp16 scale (+ fp16 zero)
        elif self.fmt.startswith("fp8"):
            per_scale = 32  # fp32 scale
        elif self.fmt in FIXED_BLOCK:
            per_scale = 8  # E8M0 / E4M3 block scale
        else:
            per_scale = 16  # fp16 group scale / absmax
        if self.granularity == "group":
            n_scales = n * self.n_groups(k)
        elif self.granularity == "channel":
            n_scales = n
        else:
            n_scales = 1
        extra = 32 if self.fmt == "nvfp4" else 0  # fp32 tensor scale
        if self.algo == "awq":
            extra += 16 * k  # fp16 runtime input scale
        return codes + per_scale * n_scales + extra

    def bits_per_weight(self, in_features: int, out_features: int = 1) -> float:
        """Exact average storage bits per weight of an [out, in] layer, metadata included."""
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
