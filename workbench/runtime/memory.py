"""Real memory of a (quantized) model: bytes of every parameter and buffer, each storage counted once.

Unlike `plan_totals` (exact storage formula of the quantizable linear layers), this reports what the
tensors of the live module actually occupy: packed codes, scales, zeros, biases, embeddings, norms, the
high-precision layers a plan kept, and the extra per-channel copy of per-tensor scales. Tied weights
(an lm_head sharing the embedding table) are counted once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from workbench.runtime.qlinear import QuantLinear


@dataclass
class MemoryReport:
    """Bytes of a model's tensors.

    total_bytes: every parameter and buffer (shared storages once).
    quantized_bytes: buffers of QuantLinear layers (packed weights, scales, zeros, input scales, biases).
    linear_bytes: weights and biases of the nn.Linear / Conv1D layers left in high precision.
    other_bytes: everything else (embeddings, norms, rotary tables).
    n_quantized: number of QuantLinear layers.
    """

    total_bytes: int
    quantized_bytes: int
    linear_bytes: int
    other_bytes: int
    n_quantized: int

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        mb = lambda b: f"{b / 1e6:,.1f} MB"
        return (
            f"model memory {mb(self.total_bytes)}: quantized layers {mb(self.quantized_bytes)} "
            f"({self.n_quantized} layers), high-precision linears {mb(self.linear_bytes)}, "
            f"other {mb(self.other_bytes)}"
        )


def _key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's storage (meta tensors have no data pointer: use the object id)."""
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device.type, t.untyped_storage().data_ptr())


def model_memory(model: torch.nn.Module) -> MemoryReport:
    """Bytes of every parameter and buffer of `model`, split by kind (see MemoryReport)."""
    from workbench.model.inventory import is_quantizable

    seen: set[tuple] = set()
    parts = {"quantized": 0, "linear": 0, "other": 0}
    n_q = 0
    for _, mod in model.named_modules():
        kind = "quantized" if isinstance(mod, QuantLinear) else "linear" if is_quantizable(mod) else "other"
        n_q += kind == "quantized"
        tensors = list(mod.parameters(recurse=False)) + [
            b for b in mod.buffers(recurse=False) if b is not None
        ]
        for t in tensors:
            k = _key(t)
            if k in seen:
                continue
            seen.add(k)
            nbytes = t.untyped_storage().nbytes() if t.device.type != "meta" else t.numel() * t.element_size()
            parts[kind] += nbytes
    return MemoryReport(
        total_bytes=sum(parts.values()),
        quantized_bytes=parts["quantized"],
        linear_bytes=parts["linear"],
        other_bytes=parts["other"],
        n_quantized=n_q,
    )
