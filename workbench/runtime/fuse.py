"""Fused linears for the decode fast path: q/k/v and gate/up as one matmul per block where they agree.

The three attention projections (and the two MLP input projections) read the same input, so at batch 1 they
can be one matmul over their weights stacked along the output dimension: one kernel launch and one pass over
x instead of three (two). The plan keeps naming the layers one by one; fusion happens here, at run time, and
only when the layers are stored alike:

* all `nn.Linear` of one dtype (bf16 / fp16 layers): the weights are concatenated;
* all `QuantLinear` of one spec that run on the GPU kernels (int 2/3/4/8, fp8_e4m3), without AWQ input
  scales: packed codes are concatenated along N, and so are the transposed scales / zeros [n_groups, N].

Anything else stays separate, with a one-line reason (`fuse_reason`), and `ApplyReport.unfused` /
`FastModel.unfused` list those groups. `LinearOp` is the plain-tensor form of one (fused) linear that the
fast path calls; it holds no module, so torch.compile sees only tensors and ints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.quant.layouts import stored_group_size
from workbench.runtime.qlinear import QuantLinear, cached_reference, fp8_linear, int_linear

FUSE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(eq=False)
class LinearOp:
    """One linear (or several fused along N) as plain tensors.

    kind: "dense" (weight [N, K]), "int" (packed int32 [N, words], scales/zeros [n_groups, N]),
    "fp8" (packed [N, K/4], scales fp32 [N]) or "module" (a QuantLinear without kernel: its own forward).
    splits: output sizes of the fused parts, in order (one entry when not fused).
    """

    kind: str
    in_features: int
    splits: tuple[int, ...]
    weight: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    bits: int = 16
    group_size: int = 0
    bias: torch.Tensor | None = None
    module: torch.nn.Module | None = None

    @property
    def out_features(self) -> int:
        return sum(self.splits)

    def nbytes(self) -> int:
        """Bytes of the tensors this op reads per call (weights, scales, zeros, bias)."""
        if self.module is not None:
            return self.module.memory_bytes()
        ts = (self.weight, self.packed, self.scales, self.zeros, self.bias)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


@torch.compiler.disable
def _module_call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def linear(op: LinearOp, x: torch.Tensor) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T (+ b) through `op`; CPU / fp32 inputs take the torch reference."""
    if op.kind == "dense":
        return F.linear(x, op.weight, op.bias)
    if op.kind == "module":
        return _module_call(op.module, x)
    fast = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    if not fast:  # the torch reference (dequant_matmul_*_ref's math), the weight unpacked once on the CPU
        y = (x.to(torch.float32) @ _reference_weight(op).t()).to(x.dtype)
    elif op.kind == "int":
        y = int_linear(x, op.packed, op.scales, op.zeros, op.bits, op.group_size, op.in_features)
    else:
        y = fp8_linear(x, op.packed, op.scales, op.in_features)
    return y + op.bias.to(y.dtype) if op.bias is not None else y


def _reference_weight(op: LinearOp) -> torch.Tensor:
    """W_hat [N, K] float32 of an "int" / "fp8" op (kept on the CPU: `qlinear.cached_reference`)."""
    from workbench.kernels.reference import dequantize_fp8, dequantize_int

    def make() -> torch.Tensor:
        if op.kind == "int":
            return dequantize_int(op.packed, op.scales, op.zeros, op.bits, op.group_size, op.in_features)
        return dequantize_fp8(op.packed, op.scales, op.in_features)

    return cached_reference(op.__dict__, [op.packed, op.scales, op.zeros], make)


def _spec_name(m: torch.nn.Module) -> str:
    if isinstance(m, QuantLinear):
        return str(m.spec)
    w = getattr(m, "weight", None)
    dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(getattr(w, "dtype", None), "unquantized")
    return dt if isinstance(m, torch.nn.Linear) else type(m).__name__


def fuse_reason(modules: list[torch.nn.Module]) -> str | None:
    """Why these linears (same input) cannot run as one matmul, or None when they can."""
    names = [_spec_name(m) for m in modules]
    if len(set(names)) > 1:
        return f"different specs ({' / '.join(names)})"
    if len({m.in_features for m in modules}) > 1:
        return "different input sizes"
    if len({m.bias is None for m in modules}) > 1:
        return "bias on some layers only"
    if isinstance(modules[0], torch.nn.Linear):
        dtypes = {m.weight.dtype for m in modules}
        return None if len(dtypes) == 1 else f"different dtypes ({', '.join(map(str, dtypes))})"
    if not isinstance(modules[0], QuantLinear):
        return f"{type(modules[0]).__name__} is not a linear the fast path knows"
    if any(m.input_scale is not None for m in modules):
        return "AWQ input scales differ per layer"
    if not modules[0].has_kernel:
        return f"{modules[0].spec} has no GPU kernel"
    return None


def spec_fuse_reason(specs: list) -> str | None:
    """`fuse_reason` decided from the plan's specs alone (before quantization): None when fusable."""
    strs = [str(s) for s in specs]
    if len(set(strs)) > 1:
        return f"different specs ({' / '.join(strs)})"
    s = specs[0]
    if s.is_quantized and s.algo == "awq":
        return "AWQ input scales differ per layer"
    if s.is_quantized:
        from workbench.runtime.qlinear import kernel_format_reason

        return kernel_format_reason(s)
    return None


def _single(m: torch.nn.Module) -> LinearOp:
    if isinstance(m, torch.nn.Linear):
        return LinearOp("dense", m.in_features, (m.out_features,), weight=m.weight, bias=m.bias)
    if not m.has_kernel or m.input_scale is not None:
        return LinearOp("module", m.in_features, (m.out_features,), module=m)
    if m.spec.fmt == "int":
        g = stored_group_size(m.spec, m.in_features)
        return LinearOp(
            "int", m.in_features, (m.out_features,), packed=m.packed, scales=m.scales, zeros=m.zeros,
            bits=m.spec.bits, group_size=g, bias=m.bias,
        )  # fmt: skip
    return LinearOp("fp8", m.in_features, (m.out_features,), packed=m.packed, scales=m.scales, bias=m.bias)


def _cat(ts: list, dim: int):
    return None if ts[0] is None else torch.cat(ts, dim=dim)


def fused_op(modules: list[torch.nn.Module]) -> LinearOp:
    """One LinearOp for linears that `fuse_reason` accepts (a copy of their tensors, stacked along N)."""
    assert fuse_reason(modules) is None, f"not fusable: {fuse_reason(modules)}"
    ops = [_single(m) for m in modules]
    if len(ops) == 1:
        return ops[0]
    o = ops[0]
    with torch.no_grad():
        return LinearOp(
            o.kind,
            o.in_features,
            tuple(op.splits[0] for op in ops),
            weight=_cat([op.weight for op in ops], 0),
            packed=_cat([op.packed for op in ops], 0),
            scales=_cat([op.scales for op in ops], 0 if o.kind == "fp8" else 1),
            zeros=_cat([op.zeros for op in ops], 1),
            bits=o.bits,
            group_size=o.group_size,
            bias=_cat([op.bias for op in ops], 0),
        )


def group_ops(
    parent: torch.nn.Module, names: tuple[str, ...], prefix: str
) -> tuple[list[LinearOp], str | None]:
    """The ops of one fuse group of `parent` (one fused op, or one per layer) and why not fused (or None)."""
    mods = [getattr(parent, n) for n in names]
    reason = fuse_reason(mods)
    if reason is None:
        return [fused_op(mods)], None
    return [_single(m) for m in mods], f"{prefix}{{{','.join(names)}}}: {reason}"


def unfused_groups(specs: dict) -> list[str]:
    """From a resolved plan {layer name: QuantSpec}: one line per q/k/v or gate/up group that the fast
    path will run as separate matmuls, with the reason (the plan itself never changes)."""
    out = []
    for group in FUSE_GROUPS:
        prefixes = {n[: -len(group[0])] for n in specs if n.endswith("." + group[0])}
        for pre in sorted(prefixes):
            names = [pre + g for g in group]
            if not all(n in specs for n in names):
                continue
            reason = spec_fuse_reason([specs[n] for n in names])
            if reason:
                out.append(f"{pre}{{{','.join(group)}}}: {reason}")
    return out
