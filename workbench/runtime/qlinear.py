"""QuantLinear: a linear layer that keeps its weight packed and multiplies on the low-bit kernels.

A `QuantLinear` replaces one `nn.Linear` (or GPT-2 `Conv1D`) of a quantized model. It holds the weight in
the packed layout of `workbench.quant.packing` as buffers, never as a float matrix:

    int (2/3/4/8 bits)   packed   int32 [N, packed_words(K, bits)]   codes, K padded (LAYOUT_VERSION 1)
                         scales   fp16  [n_groups, N]                 per-tensor specs are stored per channel
                         zeros    fp16  [n_groups, N]                 asymmetric only
    fp8_e4m3 / e5m2      packed   int32 [N, packed_words(K, 8)]      bit patterns packed like int8 codes
                         scales   fp32  [N]                           per-tensor specs are stored per channel
    fp4_e2m1 / mxfp4 /   packed   int32 [N, packed_words(K, 4)]      4-bit codes, same packing as int4
    nvfp4 / nf4          scales   fp32  [N, n_groups]                 (+ tensor_scale fp32 [] for nvfp4)
    any (AWQ)            input_scale fp32 [K]                          y = (x / input_scale) @ W_q^T
    any                  bias     [N] in the activation dtype, or absent

`forward` runs the Triton kernel (`workbench.kernels`: GEMV for 1..4 rows, tensor-core GEMM above) when the
input is fp16/bf16 on CUDA and the format has a kernel (int 2/3/4/8 with a power-of-two group or per channel,
fp8_e4m3). Everything else runs the plain-torch reference (`workbench.kernels.reference`, same math, float32
accumulation): the CPU path, fp32 activations, and formats without a kernel (fp8_e5m2, fp4_e2m1, mxfp4,
nvfp4, nf4), which `apply_plan` announces with a warning that names the layers. A CUDA input for a layer
whose group size the kernels cannot tile raises a WorkbenchError naming the layer unless the layer was
built with backend="reference".

The kernels are called through torch custom ops (`workbench::int_matmul`, `workbench::fp8_matmul`) so that
`torch.compile` treats them as opaque calls and fuses the rest of the model around them.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.quant.packing import (
    n_groups,
    pack_codes,
    packed_words,
    prepare_fp8_params,
    prepare_group_params,
)
from workbench.quant.spec import QuantSpec

INT_KERNEL_BITS = (2, 3, 4, 8)
KERNEL_FORMATS = ("int", "fp8_e4m3")
FOUR_BIT_FLOATS = ("fp4_e2m1", "mxfp4", "nvfp4", "nf4")
MAX_GEMV_ROWS = 4
BACKENDS = ("auto", "reference")
_warned_fallback: set[str] = set()


# ---------------------------------------------------------------------------------------------- support
def kernel_format_reason(spec: QuantSpec) -> str | None:
    """Why `spec`'s format has no GPU kernel (the layer falls back to the reference), or None."""
    if spec.fmt == "int" and spec.bits in INT_KERNEL_BITS:
        return None
    if spec.fmt == "fp8_e4m3":
        return None
    if spec.fmt == "int":
        return f"no kernel for {spec.bits}-bit integers (kernels: {INT_KERNEL_BITS})"
    return f"no kernel for {spec.fmt}"


def kernel_shape_reason(spec: QuantSpec, out_features: int, in_features: int) -> str | None:
    """Why the kernel of `spec`'s format cannot run an [out, in] layer, or None (formats with a kernel)."""
    from workbench.kernels.checks import group_tile

    if spec.fmt != "int":
        return None
    per = 16 if spec.bits == 3 else 32 // spec.bits
    try:
        group_tile(_group_size(spec, in_features), in_features, per, "kernel")
    except WorkbenchError as exc:
        return str(exc).removeprefix("kernel: ")
    return None


def _group_size(spec: QuantSpec, in_features: int) -> int:
    """Group size as stored: the spec's group, or K for per-channel and per-tensor (stored per channel)."""
    return spec.group_size if spec.granularity == "group" else in_features


# ---------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("workbench::int_matmul", mutates_args=())
def int_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(packed)^T on the Triton kernels (GEMV for M <= 4, else GEMM)."""
    if x.shape[0] <= MAX_GEMV_ROWS:
        from workbench.kernels.gemv_int import gemv_int

        return gemv_int(x, packed, scales_t, zeros_t, bits, group_size, K)
    from workbench.kernels.gemm_int import gemm_int

    return gemm_int(x, packed, scales_t, zeros_t, bits, group_size, K)


@int_matmul.register_fake
def _int_matmul_fake(x, packed, scales_t, zeros_t, bits, group_size, K):
    return x.new_empty(x.shape[0], packed.shape[0])


@torch.library.custom_op("workbench::fp8_matmul", mutates_args=())
def fp8_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, K: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (e4m3(codes) * scales)^T on the Triton kernels (codes packed like int8)."""
    if x.shape[0] <= MAX_GEMV_ROWS:
        from workbench.kernels.gemv_fp8 import gemv_fp8

        return gemv_fp8(x, packed, scales, K)
    from workbench.kernels.gemm_fp8 import gemm_fp8

    return gemm_fp8(x, packed, scales, K)


@fp8_matmul.register_fake
def _fp8_matmul_fake(x, packed, scales, K):
    return x.new_empty(x.shape[0], packed.shape[0])


# ---------------------------------------------------------------------------------------------- module
class QuantLinear(nn.Module):
    """y = x @ W_hat^T + b with W_hat kept packed (buffers: module docstring).

    Build it with `QuantLinear.from_quantized(qw, bias, name)`; `QuantLinear(spec, in, out, ...)` allocates
    empty buffers of the right shapes (used when loading a saved model).
    """

    def __init__(
        self,
        spec: QuantSpec | str,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        has_input_scale: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        name: str = "",
        backend: str = "auto",
    ):
        super().__init__()
        spec = QuantSpec.parse(spec)
        if not spec.is_quantized:
            raise WorkbenchError(f"layer '{name}': spec '{spec}' is not quantized; keep the nn.Linear")
        if backend not in BACKENDS:
            raise WorkbenchError(
                f"layer '{name}': unknown backend '{backend}' (choose {', '.join(BACKENDS)})"
            )
        if spec.fmt == "int" and spec.bits not in INT_KERNEL_BITS:
            raise WorkbenchError(
                f"layer '{name}': {spec.bits}-bit integers have no packed layout "
                f"(supported: {INT_KERNEL_BITS})"
            )
        self.spec, self.in_features, self.out_features = spec, int(in_features), int(out_features)
        self.name, self.backend = name, backend
        N, K = self.out_features, self.in_features
        self._format_reason = kernel_format_reason(spec)
        self._shape_reason = None if self._format_reason else kernel_shape_reason(spec, N, K)
        G = _group_size(spec, K)
        ng = n_groups(K, G)
        kw = dict(device=device)
        if spec.fmt == "int":
            self.register_buffer(
                "packed", torch.empty(N, packed_words(K, spec.bits), dtype=torch.int32, **kw)
            )
            self.register_buffer("scales", torch.empty(ng, N, dtype=torch.float16, **kw))
            zeros = None if spec.symmetric else torch.empty(ng, N, dtype=torch.float16, **kw)
            self.register_buffer("zeros", zeros)
        elif spec.fmt.startswith("fp8"):
            self.register_buffer("packed", torch.empty(N, packed_words(K, 8), dtype=torch.int32, **kw))
            self.register_buffer("scales", torch.empty(N, dtype=torch.float32, **kw))
        else:
            self.register_buffer("packed", torch.empty(N, packed_words(K, 4), dtype=torch.int32, **kw))
            self.register_buffer("scales", torch.empty(N, spec.n_groups(K), dtype=torch.float32, **kw))
            ts = torch.empty((), dtype=torch.float32, **kw) if spec.fmt == "nvfp4" else None
            self.register_buffer("tensor_scale", ts)
        self.register_buffer(
            "input_scale", torch.empty(K, dtype=torch.float32, **kw) if has_input_scale else None
        )
        self.register_buffer("bias", torch.empty(N, dtype=dtype, **kw) if bias else None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(
        cls,
        qw,
        bias: torch.Tensor | None = None,
        *,
        name: str = "",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ) -> QuantLinear:
        """Pack a `QuantizedWeight` (workbench.quant.api) into a QuantLinear.

        Args:
            qw: QuantizedWeight with codes uint8 [N, K], scales / zeros in the quant-core layout.
            bias: optional [N] bias (kept in `dtype`).
            name: layer name used in messages.
            dtype: activation dtype of the model (bias dtype); default bias dtype or float32.
            device: where the buffers live; default the device of qw.codes.
        """
        spec = qw.spec
        N, K = qw.codes.shape
        device = torch.device(device) if device is not None else qw.codes.device
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        m = cls(
            spec,
            K,
            N,
            bias=bias is not None,
            has_input_scale=qw.input_scale is not None,
            dtype=dtype,
            device=device,
            name=name,
            backend=backend,
        )
        codes = qw.codes.to(device)
        with torch.no_grad():
            if spec.fmt == "int":
                scales, zeros = qw.scales, qw.zeros
                if spec.granularity == "tensor":  # kernels read per-channel scales: expand the one value
                    scales = scales.reshape(1, 1).expand(N, 1)
                    zeros = zeros.reshape(1, 1).expand(N, 1) if zeros is not None else None
                s_t, z_t = prepare_group_params(
                    scales.to(device), None if zeros is None else zeros.to(device), K, _group_size(spec, K)
                )
                m.packed.copy_(pack_codes(codes, spec.bits))
                m.scales.copy_(s_t)
                if z_t is not None:
                    m.zeros.copy_(z_t)
            elif spec.fmt.startswith("fp8"):
                scales = qw.scales.reshape(-1)
                if scales.numel() == 1:
                    scales = scales.expand(N)
                c, s = prepare_fp8_params(codes, scales.to(device))
                m.packed.copy_(c)
                m.scales.copy_(s)
            else:
                m.packed.copy_(pack_codes(codes, 4))
                m.scales.copy_(qw.scales.to(device, torch.float32))
                if spec.fmt == "nvfp4":
                    m.tensor_scale.copy_(qw.tensor_scale.to(device, torch.float32).reshape(()))
            if qw.input_scale is not None:
                m.input_scale.copy_(qw.input_scale.to(device, torch.float32))
            if bias is not None:
                m.bias.copy_(bias.detach().to(device, dtype))
        return m

    # ------------------------------------------------------------------ properties
    @property
    def has_kernel(self) -> bool:
        """True when this layer's format and shape run on the Triton kernels (for CUDA fp16/bf16 input)."""
        return self.backend == "auto" and self._format_reason is None and self._shape_reason is None

    def memory_bytes(self) -> int:
        """Bytes held by this layer's buffers (packed codes, scales, zeros, input scale, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec}, "
            f"bias={self.bias is not None}, backend={self.backend}"
        )

    # ------------------------------------------------------------------ dtype / device moves
    def _apply(self, fn, recurse=True):
        """Move buffers with the module but keep their storage dtypes; only the bias follows `.to(dtype)`."""
        for key, buf in self._buffers.items():
            if buf is None:
                continue
            out = fn(buf)
            if key != "bias" and out.dtype != buf.dtype:
                out = buf.to(out.device)
            self._buffers[key] = out
        return self

    # ------------------------------------------------------------------ math
    def dequantize(self) -> torch.Tensor:
        """The effective weight W_hat [N, K] float32 (input_scale folded in), from the packed buffers."""
        W = self._dequantize_codes()
        return W / self.input_scale[None, :] if self.input_scale is not None else W

    def _dequantize_codes(self) -> torch.Tensor:
        """W_q [N, K] float32 from codes and scales only."""
        from workbench.kernels.reference import dequantize_fp8, dequantize_int

        spec, K = self.spec, self.in_features
        if spec.fmt == "int":
            return dequantize_int(self.packed, self.scales, self.zeros, spec.bits, _group_size(spec, K), K)
        if spec.fmt == "fp8_e4m3":
            return dequantize_fp8(self.packed, self.scales, K)
        from workbench.quant.api import QuantizedWeight
        from workbench.quant.packing import unpack_codes

        if spec.fmt == "fp8_e5m2":
            codes = unpack_codes(self.packed, 8, K)
            return codes.view(torch.float8_e5m2).to(torch.float32) * self.scales[:, None]

        codes = unpack_codes(self.packed, 4, K)
        ts = self.tensor_scale if spec.fmt == "nvfp4" else None
        return QuantizedWeight(spec, codes, self.scales, None, ts).dequantize_codes()

    def _reference(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, K] (already divided by input_scale) -> [M, N] in float32 accumulation, x2.dtype out."""
        return (x2.to(torch.float32) @ self._dequantize_codes().t()).to(x2.dtype)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if not x.is_cuda or self.backend == "reference" or x.dtype not in (torch.float16, torch.bfloat16):
            return False
        if self._format_reason is not None:
            if self.name not in _warned_fallback:
                _warned_fallback.add(self.name)
                warnings.warn(
                    f"layer '{self.name}' ({self.spec}): {self._format_reason}; running the torch "
                    "reference path (same math, slower)",
                    stacklevel=3,
                )
            return False
        if self._shape_reason is not None:
            raise WorkbenchError(
                f"layer '{self.name}' [{self.out_features}, {self.in_features}] ({self.spec}): "
                f"the GPU kernel cannot run it: {self._shape_reason} (apply with "
                "backend='reference')"
            )
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> y [..., N] in x.dtype."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            x2 = (x2.to(torch.float32) / self.input_scale).to(x.dtype)
        if self._use_kernel(x2):
            x2 = x2.contiguous()
            if self.spec.fmt == "int":
                y = int_matmul(
                    x2,
                    self.packed,
                    self.scales,
                    self.zeros,
                    self.spec.bits,
                    _group_size(self.spec, self.in_features),
                    self.in_features,
                )
            else:
                y = fp8_matmul(x2, self.packed, self.scales, self.in_features)
        else:
            y = self._reference(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)
