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

Every format-specific decision is asked of the format registry (`workbench.quant.registry`): the layout
(`format.layout`: buffers, packing, reference dequantization) and the kernel (`format.kernel`, or None).

`forward` runs the Triton kernel (`workbench.kernels`: GEMV for up to `MAX_GEMV_ROWS` rows, defined in
kernels/gemv_int.py, tensor-core GEMM above) when the input is fp16/bf16 on CUDA and the format has a
kernel (today int 2/3/4/8 with a power-of-two group of 32..256 or per channel, and fp8_e4m3). Everything
else runs the plain-torch reference (same math, float32 accumulation): the CPU path, fp32 activations, and
formats without a kernel (fp8_e5m2, fp4_e2m1, mxfp4, nvfp4, nf4), which `apply_plan` announces with a
warning that names the layers (and each layer warns once on its first CUDA call). A CUDA input for a
layer whose group size the kernels cannot tile raises a WorkbenchError naming the layer unless the layer
was built with backend="reference".

The kernels are called through torch custom ops (`workbench::int_matmul`, `workbench::fp8_matmul`, named by
`Kernel.op` in the registry) so that `torch.compile` treats them as opaque calls and fuses the rest of the
model around them. With WORKBENCH_SPLIT_PARTIALS=1 a split-K GEMV runs as `workbench::int_matmul_partials` /
`fp8_matmul_partials` instead, returning fp32 [split, M, N] per-split sums that `int_linear` / `fp8_linear`
add up outside the op (kernels/split_partials.py), so that torch.compile fuses that sum and the cast into
the residual add or norm that reads the output.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.quant.layouts import stored_group_size
from workbench.quant.packing import codes_per_word
from workbench.quant.registry import FORMATS, Kernel, format_of
from workbench.quant.spec import QuantSpec

BACKENDS = ("auto", "reference")


# ---------------------------------------------------------------------------------------------- support
def kernel_format_reason(spec: QuantSpec) -> str | None:
    """Why `spec`'s format has no GPU kernel (the layer falls back to the reference), or None."""
    return format_of(spec).kernel_reason(spec)


def kernel_shape_reason(spec: QuantSpec, out_features: int, in_features: int) -> str | None:
    """Why the kernel of `spec`'s format cannot run an [out, in] layer, or None (formats with a kernel)."""
    from workbench.kernels.checks import group_tile

    kernel = format_of(spec).kernel
    if kernel is None or not kernel.tiled_groups or kernel_format_reason(spec) is not None:
        return None
    try:
        group_tile(stored_group_size(spec, in_features), in_features, codes_per_word(spec.bits), "kernel")
    except WorkbenchError as exc:
        return str(exc).removeprefix("kernel: ")
    return None


def _launch(kernel: Kernel, x: torch.Tensor, *args) -> torch.Tensor:
    """Run `kernel`'s GEMV or GEMM launcher on x [M, K] (GEMV up to MAX_GEMV_ROWS rows)."""
    from workbench.kernels.gemv_int import MAX_GEMV_ROWS

    return kernel.launcher(x.shape[0], MAX_GEMV_ROWS)(x, *args)


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
    """y [M, N] = x [M, K] @ dequant(packed)^T on the integer Triton kernels (GEMV few rows, GEMM above)."""
    return _launch(FORMATS["int"].kernel, x, packed, scales_t, zeros_t, bits, group_size, K)


@int_matmul.register_fake
def _int_matmul_fake(x, packed, scales_t, zeros_t, bits, group_size, K):
    return x.new_empty(x.shape[0], packed.shape[0])


@torch.library.custom_op("workbench::fp8_matmul", mutates_args=())
def fp8_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, K: int) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (e4m3(codes) * scales)^T on the Triton kernels (codes packed like int8)."""
    return _launch(FORMATS["fp8_e4m3"].kernel, x, packed, scales, K)


@fp8_matmul.register_fake
def _fp8_matmul_fake(x, packed, scales, K):
    return x.new_empty(x.shape[0], packed.shape[0])


@torch.library.custom_op("workbench::int_matmul_partials", mutates_args=())
def int_matmul_partials(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
    plan: list[int],
) -> torch.Tensor:
    """fp32 [split, M, N] per-split sums of x [M, K] @ dequant(packed)^T, launched as `plan` says
    (kernels/split_partials.py `plan_split`; the split is plan[-1])."""
    from workbench.kernels.split_partials import gemv_int_partials

    return gemv_int_partials(x, packed, scales_t, zeros_t, bits, group_size, K, tuple(plan))


@int_matmul_partials.register_fake
def _int_matmul_partials_fake(x, packed, scales_t, zeros_t, bits, group_size, K, plan):
    return x.new_empty(plan[-1], x.shape[0], packed.shape[0], dtype=torch.float32)


@torch.library.custom_op("workbench::fp8_matmul_partials", mutates_args=())
def fp8_matmul_partials(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, K: int, plan: list[int]
) -> torch.Tensor:
    """fp32 [split, M, N] per-split sums of `fp8_matmul`, launched as `plan` says."""
    from workbench.kernels.split_partials import gemv_fp8_partials

    return gemv_fp8_partials(x, packed, scales, K, tuple(plan))


@fp8_matmul_partials.register_fake
def _fp8_matmul_partials_fake(x, packed, scales, K, plan):
    return x.new_empty(plan[-1], x.shape[0], packed.shape[0], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- callers
def int_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
) -> torch.Tensor:
    """y [M, N] in x.dtype through `int_matmul`, or, with split-K partials on (WORKBENCH_SPLIT_PARTIALS=1)
    and a split-K GEMV planned, `int_matmul_partials` summed here, outside the op, where torch.compile
    fuses the sum and the cast into the next op."""
    from workbench.kernels.split_partials import finish_partials, plan_split

    N = packed.shape[0]
    plan = plan_split(x.shape[0], N, K, bits, group_size, zeros_t is not None, False, x.dtype, x.device)
    if plan is None:
        return int_matmul(x, packed, scales_t, zeros_t, bits, group_size, K)
    partials = int_matmul_partials(x, packed, scales_t, zeros_t, bits, group_size, K, list(plan))
    return finish_partials(partials, x.dtype)


def fp8_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, K: int) -> torch.Tensor:
    """`int_linear` for FP8 E4M3 weights (`fp8_matmul`, or `fp8_matmul_partials` summed here)."""
    from workbench.kernels.split_partials import finish_partials, plan_split

    plan = plan_split(x.shape[0], packed.shape[0], K, 8, K, False, True, x.dtype, x.device)
    if plan is None:
        return fp8_matmul(x, packed, scales, K)
    return finish_partials(fp8_matmul_partials(x, packed, scales, K, list(plan)), x.dtype)


# ---------------------------------------------------------------------------------------------- module
_OPS = {"int_matmul": int_linear, "fp8_matmul": fp8_linear}  # Kernel.op -> the op's caller


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
        fmt = format_of(spec)
        if fmt.layout is None:
            raise WorkbenchError(f"layer '{name}': spec '{spec}' is not quantized; keep the nn.Linear")
        if backend not in BACKENDS:
            raise WorkbenchError(
                f"layer '{name}': unknown backend '{backend}' (choose {', '.join(BACKENDS)})"
            )
        reason = fmt.layout.check(spec)
        if reason:
            raise WorkbenchError(f"layer '{name}': {reason}")
        self.spec, self.in_features, self.out_features = spec, int(in_features), int(out_features)
        self.name, self.backend, self.layout = name, backend, fmt.layout
        N, K = self.out_features, self.in_features
        self._format_reason = kernel_format_reason(spec)
        self._shape_reason = None if self._format_reason else kernel_shape_reason(spec, N, K)
        self._warned = False  # the no-kernel warning is given once per layer object
        self._kernel = fmt.kernel
        self._op = _OPS[fmt.kernel.op] if fmt.kernel is not None else None
        for key, buf in fmt.layout.empty(spec, N, K, device).items():
            self.register_buffer(key, buf)
        self.register_buffer(
            "input_scale", torch.empty(K, dtype=torch.float32, device=device) if has_input_scale else None
        )
        self.register_buffer("bias", torch.empty(N, dtype=dtype, device=device) if bias else None)

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
        N, K = qw.codes.shape
        device = torch.device(device) if device is not None else qw.codes.device
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        m = cls(
            qw.spec,
            K,
            N,
            bias=bias is not None,
            has_input_scale=qw.input_scale is not None,
            dtype=dtype,
            device=device,
            name=name,
            backend=backend,
        )
        with torch.no_grad():
            for key, t in m.layout.pack(qw, device).items():
                if t is not None:
                    getattr(m, key).copy_(t)
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

    def packed_buffers(self) -> dict[str, torch.Tensor | None]:
        """The layout's buffers by name (packed, scales, zeros, tensor_scale as the layout has them)."""
        return {key: getattr(self, key) for key in self.layout.buffers}

    # ------------------------------------------------------------------ dtype / device moves
    def _apply(self, fn, recurse=True):
        """Move buffers with the module but keep their storage dtypes; only the bias follows `.to(dtype)`.

        This overrides a private torch method on purpose: torch offers no public hook that keeps a buffer's
        dtype under `model.to(dtype)`, and casting fp16 scales to bf16 would change the weights. Overriding
        the public `to()` would not do: a parent's `.to()` / `.half()` / `.cuda()` reaches its children
        through `_apply`. It touches only this module's own buffers (a QuantLinear has no parameters and
        no children).
        """
        self.__dict__.pop("_ref_cache", None)
        return keep_storage_dtypes(self, fn)

    # ------------------------------------------------------------------ math
    def dequantize(self) -> torch.Tensor:
        """The effective weight W_hat [N, K] float32 (input_scale folded in), from the packed buffers."""
        W = self._dequantize_codes()
        return W / self.input_scale[None, :] if self.input_scale is not None else W

    def _dequantize_codes(self) -> torch.Tensor:
        """W_q [N, K] float32 from codes and scales only."""
        fmt = format_of(self.spec)
        return self.layout.dequantize(self.spec, self.packed_buffers(), self.in_features, fmt.decode)

    def _reference(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, K] (already divided by input_scale) -> [M, N] in float32 accumulation, x2.dtype out."""
        return (x2.to(torch.float32) @ self._reference_weight().t()).to(x2.dtype)

    def _reference_weight(self) -> torch.Tensor:
        """W_q [N, K] float32 for the reference path. On the CPU, while no gradient is recorded, it is kept
        between calls (unpacking every weight for every token made int8 SmolLM2-135M decode at 0.1 tokens/s
        on two cores); the copy is dropped when the buffers move or change in place (their version counters).
        Elsewhere (a CUDA layer without a kernel) it is unpacked per call: no second copy in GPU memory."""
        return cached_reference(self.__dict__, list(self.packed_buffers().values()), self._dequantize_codes)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if not x.is_cuda or self.backend == "reference" or x.dtype not in (torch.float16, torch.bfloat16):
            return False
        if self._format_reason is not None:
            if not self._warned:
                self._warned = True
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
            args = self._kernel.args(self.spec, self.packed_buffers(), self.in_features)
            y = self._op(x2.contiguous(), *args)
        else:
            y = self._reference(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)


def cached_reference(store: dict, tensors: list, make) -> torch.Tensor:
    """`make()` (a dequantized float32 weight), kept in `store["_ref_cache"]` while `tensors` (the packed
    buffers it came from) keep their storage and version counters. Only on the CPU with no gradient being
    recorded: the reference path is the CPU's, and a CUDA layer without a kernel should not hold a second,
    float32 copy of its weight in GPU memory."""
    live = [t for t in tensors if t is not None]
    if live[0].device.type != "cpu" or torch.is_grad_enabled():
        return make()
    key = tuple((t.data_ptr(), t._version) for t in live)
    cached = store.get("_ref_cache")
    if cached is None or cached[0] != key:
        cached = (key, make())
        store["_ref_cache"] = cached
    return cached[1]


def keep_storage_dtypes(module: torch.nn.Module, fn) -> torch.nn.Module:
    """`module._apply(fn)` for a module of buffers only (QuantLinear, ActQuantLinear): every buffer moves
    with `fn`, but only the bias takes a new dtype; the others keep their storage types."""
    for key, buf in module._buffers.items():
        if buf is None:
            continue
        out = fn(buf)
        if key != "bias" and out.dtype != buf.dtype:
            out = buf.to(out.device)
        module._buffers[key] = out
    return module
