"""Small computations behind notebooks 03-05 (sensitivity, plans, speed), so that the notebooks hold no logic.

    sensitivity_rows(table)             a SensitivityTable in long form (one row per layer x spec)
    plan_point(table, resolved, label)  size and predicted cost of a plan over the table's layers
    uniform_points(table)               the same for every uniform plan (one spec everywhere)
    time_module(module, x)              median wall time of one call (CUDA synchronised)
    linear_timing_rows(ref, quant)      each layer's original module vs its quantized replacement

Notebooks 01-02 use `workbench.teaching.lessons`.
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError
from workbench.quant.spec import QuantSpec


# ------------------------------------------------------------------------------------------ plans
def sensitivity_rows(table) -> list[dict]:
    """Long form of a SensitivityTable: one row per (layer, spec) that has a cost.

    Returns rows: layer, role, block (-1 outside blocks), spec, bits_per_weight, cost.
    """
    rows = []
    for x in table.layers:
        for s in table.specs:
            c = table.cost.get(x.name, {}).get(s)
            if c is None:
                continue
            rows.append(
                {
                    "layer": x.name,
                    "role": x.role,
                    "block": -1 if x.block is None else x.block,
                    "spec": s,
                    "bits_per_weight": QuantSpec.parse(s).bits_per_weight(
                        out_features=x.out_features, in_features=x.in_features
                    ),
                    "cost": float(c),
                }
            )
    return rows


def plan_point(table, resolved: dict, label: str) -> dict:
    """Size and predicted cost of a plan over the layers of `table` (layers outside the table ignored).

    Args:
        table: SensitivityTable. resolved: {layer: QuantSpec or spec string} (e.g. Plan.resolve(layers)).
    Returns:
        {"plan": label, "mb", "avg_bits", "cost"} with the cost from `planedit.predicted_cost`.
    """
    from workbench.plan.edit import predicted_cost
    from workbench.plan.plan import plan_totals

    names = [x.name for x in table.layers]
    missing = [n for n in names if n not in resolved]
    if missing:
        raise WorkbenchError(f"the plan has no spec for layer '{missing[0]}' of the sensitivity table")
    sub = {n: QuantSpec.parse(resolved[n]) for n in names}
    totals = plan_totals(sub, table.layers)
    cost = predicted_cost(table, sub)
    if cost.unpriced:
        raise WorkbenchError(
            f"plan '{label}': no cost for layer '{cost.unpriced[0]}' at its spec "
            f"'{sub[cost.unpriced[0]]}' in the sensitivity table"
        )
    return {"plan": label, "mb": totals.mb, "avg_bits": totals.avg_bits, "cost": float(cost.total)}


def uniform_points(table, include_bf16: bool = True) -> list[dict]:
    """`plan_point` of every uniform plan (one spec for all layers of `table`), smallest first."""
    specs = list(table.specs) + (["bf16"] if include_bf16 else [])
    pts = [plan_point(table, {x.name: s for x in table.layers}, f"uniform {s}") for s in specs]
    return sorted(pts, key=lambda p: p["mb"])


# ------------------------------------------------------------------------------------------ speed
@torch.no_grad()
def time_module(module: torch.nn.Module, x: torch.Tensor, reps: int = 20, warmup: int = 3) -> float:
    """Median wall time in seconds of module(x) (CUDA synchronised around each call)."""
    import statistics
    import time

    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(warmup):
        module(x)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        module(x)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def linear_timing_rows(
    reference: dict[str, torch.nn.Module],
    quantized: dict[str, torch.nn.Module],
    tokens: tuple[int, ...] = (1, 16),
    reps: int = 20,
    seed: int = 0,
) -> list[dict]:
    """Time each layer's original module against its quantized replacement on the same input.

    Args:
        reference / quantized: {layer name: module} with the same keys (e.g. copies of the nn.Linear layers
            taken before `apply_plan`, and the QuantLinear modules after it).
        tokens: batch sizes M of the input x [M, in_features] (1 = decode, larger = prefill-like).
    Returns:
        rows: layer, shape "NxK", spec (the quantized module's `spec`, else "-"), tokens, reference_us,
        quantized_us, speedup (reference / quantized), device.
    """
    if set(reference) != set(quantized):
        raise WorkbenchError("reference and quantized modules must name the same layers")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name, ref in reference.items():
        q = quantized[name]
        w = next(ref.parameters())
        for m in tokens:
            x = torch.randn(m, w.shape[1], generator=gen).to(w.device, w.dtype)
            t_ref, t_q = time_module(ref, x, reps), time_module(q, x, reps)
            rows.append(
                {
                    "layer": name,
                    "shape": f"{w.shape[0]}x{w.shape[1]}",
                    "spec": str(getattr(q, "spec", "-")),
                    "tokens": m,
                    "reference_us": t_ref * 1e6,
                    "quantized_us": t_q * 1e6,
                    "speedup": t_ref / t_q if t_q > 0 else math.inf,
                    "device": str(w.device),
                }
            )
    return rows
