"""apply_plan: turn a resolved plan into a model whose quantized layers are `QuantLinear` modules.

Atomic: every layer is quantized and packed first, beside the untouched model; only when all of them are
ready are the modules swapped in (a plain attribute assignment per layer). An error or an out-of-memory
during quantization therefore leaves the original model exactly as it was, and the half-built layers are
dropped. Layers whose spec is bf16 / fp16 keep their nn.Linear.

Layers whose spec has no packed layout (5-, 6- and 7-bit integers: the allocator may choose them) keep a
plain module holding the dequantized weight (the reference math, no memory saving), with one warning naming
them. `backend="dequantized"` does this for every layer: the weights are dequantized once and the model
then runs at the original's speed (chat on a CPU, where the packed reference path would re-dequantize
every weight at every token).

Quantization runs through `workbench.quant.api.quantize_weight` (CPU, float32). For integer round-to-nearest
specs of a weight that already lives on CUDA, the same code (`workbench.quant.rtn.rtn_quantize`)
runs on the GPU instead (bit-identical codes and scales, checked in tests/test_runtime_cuda.py), which turns
minutes into seconds for 8B-sized models; float formats, GPTQ and AWQ run on CPU (the GPU's float8 casts
were seen to differ from the CPU's by a code on an H100, 2026-11-22).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from workbench.errors import WorkbenchError
from workbench.quant.registry import format_of
from workbench.runtime.act_linear import ActQuantLinear, act_kernel_reason
from workbench.runtime.fuse import unfused_groups
from workbench.runtime.memory import MemoryReport, model_memory
from workbench.runtime.qlinear import QuantLinear, kernel_format_reason, kernel_shape_reason

BACKENDS = ("auto", "reference", "dequantized")


@dataclass
class ApplyReport:
    """What apply_plan did.

    layers: name -> canonical spec string of every layer turned into a QuantLinear.
    kept: layers left in high precision (bf16 / fp16 spec).
    fallback: name -> reason, layers whose format has no GPU kernel (they run the torch reference).
    act_simulated: name -> activation spec of layers whose input is fake-quantized by a forward pre-hook (plan
        version 2; every layer on the CPU, and on the GPU the layers no W8A8 kernel runs).
    act_kernels: name -> activation spec of layers that run int8 x int8 or FP8 x FP8 (runtime/act_linear.py).
    memory_before / memory_after: real bytes of the model's tensors (MemoryReport).
    seconds: wall time of quantization + packing.
    unfused: q/k/v or gate/up groups the decode fast path runs as separate matmuls, with the reason.
    """

    layers: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    fallback: dict[str, str] = field(default_factory=dict)
    act_simulated: dict[str, str] = field(default_factory=dict)
    act_kernels: dict[str, str] = field(default_factory=dict)
    memory_before: MemoryReport | None = None
    memory_after: MemoryReport | None = None
    seconds: float = 0.0
    unfused: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "layers": self.layers,
            "kept": self.kept,
            "fallback": self.fallback,
            "act_simulated": self.act_simulated,
            "act_kernels": self.act_kernels,
            "memory_before": self.memory_before.to_json() if self.memory_before else None,
            "memory_after": self.memory_after.to_json() if self.memory_after else None,
            "seconds": self.seconds,
            "unfused": self.unfused,
        }

    def summary(self) -> str:
        lines = [
            f"quantized {len(self.layers)} layers in {self.seconds:.1f} s, kept {len(self.kept)} in high "
            "precision"
        ]
        if self.memory_before and self.memory_after:
            lines.append(
                f"memory {self.memory_before.total_bytes / 1e6:,.1f} MB -> "
                f"{self.memory_after.total_bytes / 1e6:,.1f} MB"
            )
            lines.append(self.memory_after.summary())
        if self.fallback:
            lines.append(f"{len(self.fallback)} layers run on the torch reference path (no GPU kernel)")
        if self.unfused:
            shown = "; ".join(self.unfused[:3]) + (
                f" (+{len(self.unfused) - 3} more)" if len(self.unfused) > 3 else ""
            )
            lines.append(f"{len(self.unfused)} q/k/v or gate/up groups not fused: {shown}")
        return "\n".join(lines)


def _resolved_for(model: torch.nn.Module, plan):
    """The ResolvedPlan to apply (`ResolvedPlan.of`), refusing layers the model does not have."""
    from workbench.plan.plan import ResolvedPlan

    resolved = ResolvedPlan.of(model, plan)
    names = {n for n, _ in model.named_modules()}
    unknown = [n for n in resolved if n not in names]
    if unknown:
        raise WorkbenchError(
            f"plan names layers the model does not have: {', '.join(unknown[:5])}"
            + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        )
    return resolved


def quantize_layer(name: str, W: torch.Tensor, spec, gram: torch.Tensor | None = None):
    """Quantize one [N, K] weight; integer RTN on the GPU when W is on CUDA, else quantize_weight on CPU."""
    from workbench.quant.api import QuantizedWeight, quantize_weight

    if W.is_cuda and spec.format.device_encode and spec.algo == "rtn" and gram is None:
        from workbench.quant.formats import ungrouped
        from workbench.quant.rtn import rtn_quantize

        N, K = W.shape
        reason = spec.check_layer(N, K)
        if reason:
            raise WorkbenchError(f"spec '{spec}' cannot apply to layer '{name}' [{N}, {K}]: {reason}")
        Wf = W.detach().to(torch.float32)
        if not bool(torch.isfinite(Wf).all()):
            raise WorkbenchError(f"NaN or inf in the weights of layer '{name}'")
        enc = rtn_quantize(Wf, spec)
        codes = ungrouped(enc.codes, spec, N, K).contiguous()
        return QuantizedWeight(spec, codes, enc.scales, enc.zeros, enc.tensor_scale)
    return quantize_weight(W, spec, gram, layer=name)


def layout_reason(spec) -> str | None:
    """Why `spec` has no packed layout (the layer keeps a dequantized dense weight), or None."""
    layout = format_of(spec).layout
    if layout is None:
        return f"{spec.fmt} has no packed layout"
    return layout.check(spec)


def dense_copy(module: torch.nn.Module, W_hat: torch.Tensor) -> torch.nn.Module:
    """A copy of a linear `module` (nn.Linear or GPT-2 Conv1D) whose weight is W_hat [out, in]; the
    original module and its parameters are untouched (the bias is shared)."""
    import copy

    from workbench.measure.simulate import set_weight

    new = copy.copy(module)
    new._parameters = dict(module._parameters)  # own parameter dict: setting the weight must not leak
    set_weight(new, W_hat.detach())
    return new


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def apply_plan(
    model: torch.nn.Module,
    resolved,
    grams: dict[str, torch.Tensor] | None = None,
    *,
    backend: str = "auto",
    on_layer: Callable[[str, int, int], None] | None = None,
    warn: bool = True,
) -> ApplyReport:
    """Quantize `model` in place according to a plan; bf16/fp16 layers stay untouched.

    Args:
        model: a transformers CausalLM (any device / dtype); the QuantLinear layers are built on the device
            of each weight, with the weight's dtype as activation dtype.
        resolved: a ResolvedPlan (`plan.resolve(model)`), used as it is; a Plan or an explicit
            {layer: spec} is resolved once here (`ResolvedPlan.of`). Plan file paths are refused.
        grams: {layer name: [K, K] X^T X} for GPTQ / AWQ layers.
        backend: "auto" (kernels where they exist), "reference" (torch reference everywhere) or
            "dequantized" (every layer a dense module holding its dequantized weight: module doc).
        on_layer: progress callback (name, index, total), called before each layer is quantized.
        warn: emit one warning naming the layers whose format has no GPU kernel.
    Returns:
        ApplyReport.
    Raises:
        WorkbenchError: a path or other non-plan, a layer the model lacks, a bad spec, missing Gram for
            GPTQ/AWQ, out of memory, or (model on CUDA, backend "auto") a layer shape the kernels cannot
            run. The model is unchanged.
    """
    t0 = time.perf_counter()
    if backend not in BACKENDS:
        raise WorkbenchError(f"unknown backend '{backend}' (choose {', '.join(BACKENDS)})")
    resolved = _resolved_for(model, resolved)
    _check_transformed(model, resolved)
    report = ApplyReport(memory_before=model_memory(model), kept=resolved.kept)
    todo = [(n, resolved[n]) for n in resolved.quantized]
    if backend == "auto":
        _refuse_untileable(model, todo)
    built = _build_layers(model, todo, grams or {}, backend, on_layer, resolved.acts)
    _swap_in(model, built)
    report.act_kernels = {n: str(resolved.acts[n]) for n, m in built.items() if isinstance(m, ActQuantLinear)}
    report.layers = {n: str(s) for n, s in todo}
    report.unfused = unfused_groups(resolved)
    report.fallback = {
        n: r for n, s in todo if (r := layout_reason(s) or kernel_format_reason(s)) is not None
    }
    if backend != "auto":
        report.fallback = {n: f"backend='{backend}'" for n, _ in todo}
    if warn and report.fallback and backend == "auto":
        _warn_fallback(report.fallback)
    simulated = {n: a for n, a in resolved.acts.items() if n not in report.act_kernels}
    report.act_simulated = _simulate_acts(model, simulated, warn)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    report.memory_after = model_memory(model)
    report.seconds = time.perf_counter() - t0
    return report


def _check_transformed(model: torch.nn.Module, resolved) -> None:
    """A plan with transforms applies only to a model those transforms were applied to (on a copy)."""
    if resolved.transforms and getattr(model, "workbench_transforms", ()) != resolved.transforms:
        kinds = ", ".join(
            f"{t.kind}:{getattr(t, 'where', getattr(t, 'match', ''))}" for t in resolved.transforms
        )
        raise WorkbenchError(
            f"the plan's transforms ({kinds}) were not applied to this model: quantize "
            "workbench.transform.apply.apply_transforms(loaded, plan.transforms).model instead"
        )


def _simulate_acts(model: torch.nn.Module, acts: dict, warn: bool) -> dict[str, str]:
    """Fake-quantize the inputs of `acts` layers by forward pre-hooks (the layers no W8A8 kernel runs); each
    such module gets `workbench_act` (its activation spec string)."""
    from workbench.measure.simulate import add_act_hooks
    from workbench.model.inventory import get_module

    if not acts:
        return {}
    add_act_hooks(model, acts)
    for name, act in acts.items():  # what save_quantized records, so that load_quantized re-attaches it
        get_module(model, name).workbench_act = str(act)
    if warn:
        names = list(acts)
        more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
        warnings.warn(
            f"activation specs without a W8A8 kernel: {len(names)} layers ({', '.join(names[:3])}{more}) "
            "run with simulated (fake-quantized) inputs (kernels: act int8_tok_sym with int8_ch_sym weights, "
            "act fp8_e4m3_tok with fp8_e4m3 weights, on CUDA fp16/bf16)",
            stacklevel=3,
        )
    return {n: str(a) for n, a in acts.items()}


def _refuse_untileable(model: torch.nn.Module, todo: list) -> None:
    """Before any work: a CUDA layer whose format has a kernel but whose shape it cannot tile is an error."""
    from workbench.model.inventory import get_linear_weight, get_module

    for name, spec in todo:
        W = get_linear_weight(get_module(model, name))
        if W.is_cuda and kernel_format_reason(spec) is None and not layout_reason(spec):
            reason = kernel_shape_reason(spec, W.shape[0], W.shape[1])
            if reason:
                raise WorkbenchError(
                    f"layer '{name}' [{W.shape[0]}, {W.shape[1]}] ({spec}): the GPU kernel "
                    f"cannot run it: {reason}; use backend='reference' or another spec"
                )


def _build_layers(
    model, todo: list, grams: dict, backend: str, on_layer, acts: dict | None = None
) -> dict[str, torch.nn.Module]:
    """Quantize and pack every planned layer beside the untouched model (dropped on any error).

    A layer whose activation spec (`acts`) and weight spec have a W8A8 kernel becomes an ActQuantLinear."""
    from workbench.model.inventory import get_linear_weight, get_module
    from workbench.transform.rotate import carry_online_hadamard

    built: dict[str, QuantLinear] = {}
    current = None
    try:
        for i, (name, spec) in enumerate(todo):
            current = name
            if on_layer is not None:
                on_layer(name, i, len(todo))
            mod = get_module(model, name)
            W = get_linear_weight(mod)
            with torch.no_grad():
                qw = quantize_layer(name, W, spec, grams.get(name))
                act = (acts or {}).get(name)
                if backend == "auto" and act and act_kernel_reason(spec, act, W, qw.input_scale) is None:
                    built[name] = ActQuantLinear.from_quantized(qw, act, mod.bias, name, W.device, W.dtype)
                elif backend == "dequantized" or layout_reason(spec):
                    built[name] = dense_copy(mod, qw.dequantize().to(W.device, W.dtype))
                else:
                    built[name] = QuantLinear.from_quantized(
                        qw, mod.bias, name=name, dtype=W.dtype, device=W.device, backend=backend
                    )
            carry_online_hadamard(mod, built[name])  # a rotated model's down_proj keeps its x -> x H
            del qw
    except BaseException as exc:
        built.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if _is_oom(exc):
            raise WorkbenchError(
                f"out of memory while quantizing layer '{current}'; the model is unchanged "
                f"({len(todo)} layers planned)"
            ) from exc
        raise
    return built


def _swap_in(model: torch.nn.Module, built: dict[str, QuantLinear]) -> None:
    """Plain attribute assignments; the originals come back if any assignment fails."""
    originals: dict[str, torch.nn.Module] = {}
    try:
        for name, qmod in built.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            originals[name] = getattr(parent, leaf)
            setattr(parent, leaf, qmod)
    except BaseException:
        for name, orig in originals.items():
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, orig)
        raise


def _warn_fallback(fallback: dict[str, str]) -> None:
    """One warning naming the layers that run the torch reference path (stacklevel: apply_plan's caller)."""
    names = list(fallback)
    shown = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
    kinds = sorted(set(fallback.values()))
    warnings.warn(
        f"{len(names)} layers have no GPU kernel ({'; '.join(kinds)}): {shown}; they run the "
        "torch reference path (same math, slower; no packed layout: the dequantized weight)",
        stacklevel=3,
    )
