"""ActQuantLinear: a linear layer whose input *and* weight are 8-bit on the GPU (W8A8 int8, FP8 W8A8).

A plan (version 2) gives a layer an activation spec beside its weight spec. Where a kernel multiplies both in
8 bits (kernels/gemm_w8a8.py), `apply_plan` builds this module instead of a `QuantLinear` plus a simulating
input hook:

    act int8_tok_sym[_clip r]   weight int8_ch_sym / int8_t_sym    w_q int8 [N, K], s_w fp32 [N]   int8 x int8
    act fp8_e4m3_tok[_clip r]   weight fp8_e4m3 / fp8_e4m3_t       w_q e4m3 [N, K], s_w fp32 [N]   FP8 x FP8

`act_kernel_reason(spec, act, W)` says why a layer cannot run this way (asymmetric or grouped specs, another
weight format, AWQ's input scale, a CPU or fp32 weight, an FP8 shape or GPU that `torch._scaled_mm`
lacks); such layers keep the simulated input (fake quantization by a forward pre-hook) and `apply_plan`
names them in one warning. The weight buffers hold exactly the codes of the plan's quantizer
(w_q * s_w == the dequantized weight), so the module computes what the CPU simulation computes, up to
accumulation order.

The matmuls are torch custom ops (`workbench::w8a8_int8`, `workbench::w8a8_fp8`): torch.compile sees one
call. On the CPU (a saved W8A8 model loaded there, runtime/serialize.py) the module runs the kernels' torch
twins (kernels/reference.py: the simulated input times the dequantized weight), so no GPU is needed to read
one back.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.quant.act import ActSpec
from workbench.runtime.qlinear import keep_storage_dtypes

ACT_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
CODE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}  # w_q's storage type per kind


@torch.library.custom_op("workbench::w8a8_int8", mutates_args=())
def w8a8_int8_op(x: torch.Tensor, w_q: torch.Tensor, s_w: torch.Tensor, clip: float) -> torch.Tensor:
    """y [M, N] = int8(x [M, K]) @ w_q^T, per-token and per-channel scales (kernels/gemm_w8a8.py)."""
    from workbench.kernels.gemm_w8a8 import w8a8_int8

    return w8a8_int8(x, w_q, s_w, clip)


@w8a8_int8_op.register_fake
def _w8a8_int8_fake(x, w_q, s_w, clip):
    return x.new_empty(x.shape[0], w_q.shape[0])


@torch.library.custom_op("workbench::w8a8_fp8", mutates_args=())
def w8a8_fp8_op(x: torch.Tensor, w_q: torch.Tensor, s_w: torch.Tensor, clip: float) -> torch.Tensor:
    """y [M, N] = e4m3(x [M, K]) @ w_q^T on torch._scaled_mm (kernels/gemm_w8a8.py)."""
    from workbench.kernels.gemm_w8a8 import w8a8_fp8

    return w8a8_fp8(x, w_q, s_w, clip)


@w8a8_fp8_op.register_fake
def _w8a8_fp8_fake(x, w_q, s_w, clip):
    return x.new_empty(x.shape[0], w_q.shape[0])


def act_kind(spec, act: ActSpec | None) -> str | None:
    """'int8' or 'fp8' when the (weight spec, act spec) pair has a W8A8 kernel, else None (shapes aside)."""
    if act is None or act.group_size is not None:
        return None
    per_row = spec.granularity in ("channel", "tensor")
    if act.fmt == "int8" and act.sym and spec.fmt == "int" and spec.bits == 8 and spec.symmetric and per_row:
        return "int8"
    if act.fmt == "fp8_e4m3" and spec.fmt == "fp8_e4m3" and per_row:
        return "fp8"
    return None


def act_kernel_reason(spec, act: ActSpec, W: torch.Tensor, input_scale=None) -> str | None:
    """Why the layer (weight spec, act spec, weight W [N, K]) cannot run a W8A8 kernel, or None."""
    from workbench.kernels.gemm_w8a8 import fp8_mm_reason

    kind = act_kind(spec, act)
    if kind is None:
        return (
            f"no kernel for act {act} with weights {spec} (kernels: act int8_tok_sym with int8_ch_sym, "
            "act fp8_e4m3_tok with fp8_e4m3)"
        )
    if not W.is_cuda or W.dtype not in ACT_KERNEL_DTYPES:
        return f"the W8A8 kernels run on CUDA fp16/bf16 (weight is {W.dtype} on {W.device.type})"
    if input_scale is not None:
        return "AWQ input scale (no W8A8 kernel divides by it)"
    if kind == "fp8":
        return fp8_mm_reason(W.shape[0], W.shape[1], W.device)
    return None


class ActQuantLinear(nn.Module):
    """y = q(x) @ w_q^T * scales + b, with q the per-token activation quantizer (module docstring)."""

    def __init__(self, kind: str, act: ActSpec, w_q: torch.Tensor, s_w: torch.Tensor, bias, name: str = ""):
        super().__init__()
        assert kind in CODE_DTYPES, f"unknown W8A8 kind {kind!r}"
        self.kind, self.act, self.name = kind, act, name
        self.out_features, self.in_features = w_q.shape
        self.register_buffer("w_q", w_q.contiguous())
        self.register_buffer("s_w", s_w.to(torch.float32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def empty(
        cls,
        kind: str,
        act: ActSpec | str,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        dtype,
        name: str,
    ) -> ActQuantLinear:
        """Uninitialised buffers of the right shapes and storage types (a saved model's loader fills them):
        w_q [N, K] int8 / e4m3, s_w fp32 [N], bias [N] in `dtype`."""
        N, K = int(out_features), int(in_features)
        w_q = torch.empty(N, K, dtype=CODE_DTYPES[kind])
        b = torch.empty(N, dtype=dtype) if bias else None
        return cls(kind, ActSpec.parse(act), w_q, torch.empty(N, dtype=torch.float32), b, name)

    @classmethod
    def from_quantized(cls, qw, act: ActSpec, bias, name: str, device, dtype) -> ActQuantLinear:
        """From a QuantizedWeight of an int8 symmetric per-channel/tensor or FP8 E4M3 spec.

        The stored codes are recovered exactly: w_q = W_q / s_w with s_w the spec's scale of each row.
        """
        kind = act_kind(qw.spec, act)
        assert kind is not None, f"layer '{name}': {qw.spec} with act {act} has no W8A8 kernel"
        W = qw.dequantize_codes().to(device)  # [N, K] float32
        N = W.shape[0]
        s_w = qw.scales.to(device, torch.float32).reshape(-1).expand(N).contiguous()  # [N] (per tensor: 1)
        q = W / s_w[:, None]
        if kind == "int8":
            w_q = torch.round(q).clamp(-128, 127).to(torch.int8)
        else:
            w_q = q.to(torch.float8_e4m3fn)
        b = None if bias is None else bias.detach().to(device, dtype)
        return cls(kind, act, w_q, s_w, b, name)

    def weight_hat(self) -> torch.Tensor:
        """The dequantized weight [N, K] float32 (w_q * s_w)."""
        return self.w_q.float() * self.s_w[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] fp16/bf16 -> y [..., N] in x.dtype."""
        x2 = x.reshape(-1, self.in_features).contiguous()  # [M, K]
        if x2.is_cuda:
            op = w8a8_int8_op if self.kind == "int8" else w8a8_fp8_op
        else:  # the kernels' torch twins (same signatures): a saved W8A8 model read on the CPU
            from workbench.kernels.reference import w8a8_fp8_ref, w8a8_int8_ref

            op = w8a8_int8_ref if self.kind == "int8" else w8a8_fp8_ref
        y = op(x2, self.w_q, self.s_w, self.act.clip)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        """Move buffers with the module but keep w_q's and s_w's storage types (`model.to(dtype)` must not
        cast the e4m3 codes); only the bias follows. QuantLinear._apply explains the override."""
        return keep_storage_dtypes(self, fn)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.kind} W8A8, act={self.act}"
