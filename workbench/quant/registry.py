"""The format registry: one `Format` object per QuantSpec format, asked by every caller instead of a chain of
`if spec.fmt == ...`.

A `Format` holds everything the workbench knows about one storage format:
    grammar      code bits (fixed, or chosen by the spec for `int`), allowed granularities (the default first,
                 None when the spec string must name one), fixed block size, algorithms, symmetric or not
    accounting   storage bits of one scale, of one zero point (asymmetric specs), of a tensor-wide scale
    encode/decode  grouped weight [R, n_groups, G] <-> `Encoded` codes and scales (formats.py,
                 formats_float.py); None for the high-precision formats (bf16 / fp16), which have `dtype`
    layout       the packed buffers of a `QuantLinear` (layouts.py), or None
    kernel       the GPU kernel that multiplies by that layout (`Kernel`: launchers named by their module and
                 function in kernels/), or None: the layer runs the plain-torch reference path
    gguf         the nearest llama.cpp (GGUF) tensor type, for export.py
    gguf_write   (type the `gguf` package writes, True when it is the same format), for export_gguf.py

Who asks it: spec.py (parsing, printing, validation, storage accounting), formats/registry `encode` /
`decode` (rtn, awq, stats, teaching), api.py (`fake_quant` of high-precision specs), runtime/qlinear.py
(buffers, packing, reference dequantization, kernel choice), export.py (GGUF type).

Adding a format = its encode/decode primitives (formats_float.py) + one entry in `FORMATS` below; a format
that reuses a packed layout and kernel names them, one with a new kernel adds the kernel files and its op.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from workbench.errors import WorkbenchError
from workbench.quant import formats_float as ff
from workbench.quant import layouts
from workbench.quant.formats import Encoded, decode_int, encode_int
from workbench.quant.packing import SUPPORTED_BITS

if TYPE_CHECKING:
    from workbench.quant.spec import QuantSpec

ALGOS = ("rtn", "gptq", "awq")
GRANULARITIES = ("group", "channel", "tensor", "none")
GRANULARITY_PART = {"group": "_g{G}", "channel": "_ch", "tensor": "_t"}  # how a spec string names them


@dataclass(frozen=True)
class Kernel:
    """A GPU kernel family that multiplies activations by one packed layout.

    op: the torch custom op of runtime/qlinear.py that launches it (opaque to torch.compile).
    gemv / gemm: launchers as "module:function" under workbench.kernels (GEMV for few rows, GEMM above).
    bits: integer code widths the kernel reads (empty: the format's one fixed width).
    tiled_groups: the group size must tile whole 32-column chunks (kernels/checks.py `group_tile`).
    args: the launcher's arguments after x: args(spec, buffers, K) -> tuple.
    """

    op: str
    gemv: str
    gemm: str
    args: Callable[[QuantSpec, dict, int], tuple]
    bits: tuple[int, ...] = ()
    tiled_groups: bool = False

    def launcher(self, rows: int, max_gemv_rows: int) -> Callable:
        """The launcher function for an input of `rows` rows (imported on first use: Triton loads lazily)."""
        module, _, fn = (self.gemv if rows <= max_gemv_rows else self.gemm).partition(":")
        return getattr(importlib.import_module(module), fn)


@dataclass(frozen=True)
class Format:
    """One storage format (module docstring)."""

    name: str
    code_bits: int | None  # None: the spec chooses (int2..int8)
    granularities: tuple[str, ...]  # allowed
    default_granularity: str | None  # None: the spec string must name one
    scale_bits: int  # storage of one scale (0: no scales)
    zero_bits: int = 0  # storage of one zero point, asymmetric specs only
    tensor_scale_bits: int = 0  # one tensor-wide scale
    fixed_block: int | None = None
    algos: tuple[str, ...] = ("rtn",)
    symmetric_only: bool = True
    encode: Callable[[QuantSpec, torch.Tensor, object], Encoded] | None = None
    decode: Callable[[QuantSpec, Encoded], torch.Tensor] | None = None
    dtype: torch.dtype | None = None  # high-precision formats: the dtype the weight is kept in
    layout: layouts.Layout | None = None
    kernel: Kernel | None = None
    gguf: Callable[[QuantSpec], str] = field(default=lambda spec: "f16")
    gguf_write: Callable[[QuantSpec], tuple[str, bool]] = field(default=lambda spec: ("F16", False))
    device_encode: bool = (
        False  # RTN encode is bit-identical on CUDA (tests/test_runtime_cuda.py): apply_plan
    )
    # quantizes on the weight's GPU; other formats go to the CPU (float8 casts differed by a code on an H100)

    @property
    def is_quantized(self) -> bool:
        """False for the high-precision formats (bf16 / fp16): nothing to encode, the layer is kept."""
        return self.encode is not None

    @property
    def family(self) -> str:
        """The first word of the name ('fp8' for fp8_e4m3): spec strings name the rest as a second part."""
        return self.name.split("_", 1)[0]

    def kernel_reason(self, spec: QuantSpec) -> str | None:
        """Why `spec` has no GPU kernel (the layer runs the torch reference), or None."""
        if self.kernel is None:
            return f"no kernel for {self.name}"
        if self.kernel.bits and spec.bits not in self.kernel.bits:
            return f"no kernel for {spec.bits}-bit integers (kernels: {self.kernel.bits})"
        return None


def _int_kernel_args(spec: QuantSpec, bufs: dict, K: int) -> tuple:
    G = layouts.stored_group_size(spec, K)
    return (bufs["packed"], bufs["scales"], bufs["zeros"], spec.bits, G, K)


def _fp8_kernel_args(spec: QuantSpec, bufs: dict, K: int) -> tuple:
    return (bufs["packed"], bufs["scales"], K)


INT_KERNEL = Kernel(
    op="int_matmul",
    gemv="workbench.kernels.gemv_int:gemv_int",
    gemm="workbench.kernels.gemm_int:gemm_int",
    args=_int_kernel_args,
    bits=SUPPORTED_BITS,
    tiled_groups=True,
)
FP8_KERNEL = Kernel(
    op="fp8_matmul",
    gemv="workbench.kernels.gemv_fp8:gemv_fp8",
    gemm="workbench.kernels.gemm_fp8:gemm_fp8",
    args=_fp8_kernel_args,
)
_GGUF_INT = {8: "q8_0", 7: "q8_0", 6: "q6_K", 5: "q5_K", 4: "q4_K", 3: "q3_K", 2: "q2_K"}
_GGUF_WRITE_INT = {
    (8, True): "Q8_0",
    (4, True): "Q4_0",
    (4, False): "Q4_1",
    (5, True): "Q5_0",
    (5, False): "Q5_1",
}


def _gguf_write_int(spec: QuantSpec) -> tuple[str, bool]:
    """The integer type the `gguf` package writes (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: 32-weight groups, RTN) and
    whether it is the spec itself; 2/3-bit specs are written as 4-bit, 6/7-bit as 8-bit."""
    same = spec.granularity == "group" and spec.group_size == 32 and spec.algo == "rtn"
    if spec.bits >= 6:
        return "Q8_0", same and spec.bits == 8 and spec.symmetric
    bits = max(spec.bits, 4)
    return _GGUF_WRITE_INT[(bits, spec.symmetric)], same and bits == spec.bits


def _float(name: str, bits: int, scale_bits: int, encode, decode, layout, **kw) -> Format:
    """A symmetric float format with RTN only."""
    return Format(name, bits, scale_bits=scale_bits, encode=encode, decode=decode, layout=layout, **kw)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "bf16",
            16,
            ("none",),
            "none",
            0,
            dtype=torch.bfloat16,
            gguf=lambda s: "bf16",
            gguf_write=lambda s: ("BF16", True),
        ),
        Format(
            "fp16",
            16,
            ("none",),
            "none",
            0,
            dtype=torch.float16,
            gguf=lambda s: "f16",
            gguf_write=lambda s: ("F16", True),
        ),
        Format(
            "int",
            None,
            ("group", "channel", "tensor"),
            None,
            scale_bits=16,
            zero_bits=16,
            algos=ALGOS,
            symmetric_only=False,
            encode=encode_int,
            decode=decode_int,
            layout=layouts.INT,
            kernel=INT_KERNEL,
            gguf=lambda s: _GGUF_INT[s.bits],
            gguf_write=_gguf_write_int,
            device_encode=True,
        ),
        *(
            _float(
                name,
                8,
                32,
                ff.encode_fp8,
                ff.decode_fp8,
                layouts.FP8,
                granularities=("channel", "tensor"),
                default_granularity="channel",
                kernel=FP8_KERNEL if name == "fp8_e4m3" else None,
                gguf=lambda s: "q8_0",
                gguf_write=lambda s: ("Q8_0", False),
            )
            for name in ("fp8_e4m3", "fp8_e5m2")
        ),
        _float(
            "fp4_e2m1",
            4,
            16,
            ff.encode_fp4,
            ff.decode_e2m1,
            layouts.FP4,
            granularities=("group",),
            default_granularity=None,
            gguf=lambda s: "mxfp4",
            gguf_write=lambda s: ("MXFP4", False),
        ),
        _float(
            "mxfp4",
            4,
            8,
            ff.encode_mxfp4,
            ff.decode_e2m1,
            layouts.FP4,
            granularities=("group",),
            default_granularity="group",
            fixed_block=32,
            gguf=lambda s: "mxfp4",
            gguf_write=lambda s: ("MXFP4", True),
        ),
        _float(
            "nvfp4",
            4,
            8,
            ff.encode_nvfp4,
            ff.decode_nvfp4,
            layouts.FP4,
            granularities=("group",),
            default_granularity="group",
            fixed_block=16,
            tensor_scale_bits=32,
            gguf=lambda s: "mxfp4",
            gguf_write=lambda s: ("MXFP4", False),
        ),
        _float(
            "nf4",
            4,
            16,
            ff.encode_nf4,
            ff.decode_nf4,
            layouts.FP4,
            granularities=("group",),
            default_granularity=None,
            gguf=lambda s: "iq4_nl",
            gguf_write=lambda s: ("Q4_0", False),
        ),
    )
}


def format_of(spec: QuantSpec | str) -> Format:
    """The registry entry of a spec (or of a format name such as 'nvfp4')."""
    name = spec if isinstance(spec, str) else spec.fmt
    try:
        return FORMATS[name]
    except KeyError:
        raise WorkbenchError(f"unknown format {name!r} (formats: {', '.join(FORMATS)})") from None


def encode(spec: QuantSpec, Wg: torch.Tensor, shrink: torch.Tensor | float | None = None) -> Encoded:
    """Quantize a grouped float32 weight [R, n_groups, G] with `spec`'s format (round to nearest).

    `shrink` ([R, n_groups] or scalar, in (0, 1]) scales each group's range / absmax down (clipping search).
    """
    fmt = format_of(spec)
    assert fmt.encode is not None, f"encode called for non-quantized spec {spec}"
    return fmt.encode(spec, Wg, shrink)


def decode(spec: QuantSpec, enc: Encoded) -> torch.Tensor:
    """Dequantize codes [R, n_groups, G] back to float32 values of the same shape."""
    fmt = format_of(spec)
    assert fmt.decode is not None, f"decode called for non-quantized spec {spec}"
    return fmt.decode(spec, enc)
