"""Calibrating a sensitivity table on measured whole plans: uniform plans first, then the allocator's own.

A Fisher-weighted cost is a second-order estimate of the KL of quantizing one layer alone. Summed over
layers it ranks plans of one spec well, but its error depends on the spec: small perturbations (int8, int6,
4-bit) are over-estimated, large ones (3-bit, 2-bit) under-estimated, since KL grows faster than quadratically
once the error is large. An allocator fed such a table prefers the under-estimated specs, and a mixed plan
can then measure worse than the uniform plan of the same size (see benchmarks/RESULTS.md, "Plans you can
trust").

Two stages, both measured on the scan windows from the cached reference of `replay.BlockRunner` (one
forward pass per plan, all its layers fake-quantized):

1. `calibrate_table` ("uniform"): the KL of the uniform plan of every spec; that spec's costs are multiplied
   by measured / predicted, so the table predicts every uniform plan exactly.
2. `refine_table` ("mixed"): per-spec scales fitted on uniform plans alone still price the allocator's
   mixtures too low (on `default`, ~2.4x at 4.25 bits: the allocator picks exactly the layers whose cost is
   under-estimated). So the allocator's own proposals are measured too, at every uniform plan's size and
   at the standard budgets, and the per-spec scales are refitted by non-negative least squares on the
   relative error of every measured plan, uniform and mixed; then again, for a few rounds: allocate ->
   measure -> refit. This is measured feedback in the search loop, as in HAQ (Wang et al. 2019,
   https://arxiv.org/abs/1811.08886), with a linear surrogate instead of a learned policy.

Every measured plan is kept in the table (`table.calibration["plans"]`: its spec per layer and its KL), so
the allocator can refuse to return a plan that measured worse than another one that fits in the same
budget (`allocate.allocate_table`'s guard).
"""

from __future__ import annotations

import numpy as np
import torch

MIXED_BUDGETS = (3.0, 3.5, 4.0, 4.5, 5.0)  # average bits per weight measured besides the uniform sizes
MIXED_ROUNDS = 2  # refits after the first measured round (each adds at most one plan per budget)


def uniform_kls(loaded, table, windows: torch.Tensor, grams: dict, on_spec=None) -> dict[str, float]:
    """{spec: mean KL(P_ref || P_q)} of the uniform plan of each table spec on `windows` [n, L].

    Specs that cannot apply to every layer are left out. `on_spec(i, n, spec)` is called before each.
    """
    from workbench.errors import WorkbenchError
    from workbench.plan import Plan
    from workbench.replay import BlockRunner

    runner = BlockRunner(loaded.model)
    runner.capture(windows)
    out = {}
    for i, spec in enumerate(table.specs):
        if on_spec is not None:
            on_spec(i, len(table.specs), spec)
        try:
            resolved = Plan(default=spec).resolve(table.layers)
        except WorkbenchError:
            continue
        out[spec] = plan_kl(loaded, runner, resolved, grams)
    return out


def plan_kl(loaded, runner, resolved: dict, grams: dict) -> float:
    """Mean KL of the whole plan `resolved` ({layer: spec}) on the windows `runner` captured."""
    from workbench.simulate import quantized_weight

    weights = {n: quantized_weight(loaded.model, n, s, grams) for n, s in resolved.items()}
    return runner.kl_from(0, weights)


def calibrate_table(loaded, table, windows: torch.Tensor, grams: dict, on_spec=None) -> dict:
    """Scale each spec's costs in `table` (in place) so that its uniform plan's summed cost equals the KL
    measured on `windows`; returns {spec: {"measured", "predicted", "scale"}} (the record kept in the
    table's calibration under "uniform")."""
    measured = uniform_kls(loaded, table, windows, grams, on_spec)
    record = {}
    for spec, kl in measured.items():
        predicted = sum(table.cost[x.name][spec] for x in table.layers)
        scale = kl / predicted if predicted > 0 else 1.0
        record[spec] = {"measured": kl, "predicted": predicted, "scale": scale}
        for x in table.layers:
            table.cost[x.name][spec] *= scale
    return record


# ---------------------------------------------------------------------- the mixed stage
def fit_scales(raw: dict, plans: list[dict], layers, specs: list[str]) -> dict[str, float]:
    """Per-spec scales a_s >= 0 minimising sum_p (sum_s a_s R_ps / K_p - 1)^2 (non-negative least squares).

    Args:
        raw: {layer: {spec: unscaled cost}}.
        plans: measured plans, each {"specs": [spec per layer, in `layers` order], "kl": K_p}.
        specs: the table's specs (bf16 and specs absent from every plan keep scale 1).
    Returns:
        {spec: scale}; R_ps is the raw cost summed over the layers of plan p at spec s.
    """
    from scipy.optimize import nnls

    used = [s for s in specs if any(s in p["specs"] for p in plans)]
    rows = []
    for p in plans:
        r = dict.fromkeys(used, 0.0)
        for x, s in zip(layers, p["specs"]):
            if s in r:
                r[s] += raw[x.name][s]
        rows.append([r[s] / p["kl"] for s in used])
    a, _ = nnls(np.array(rows), np.ones(len(plans)))
    return {s: float(a[used.index(s)]) if s in used and a[used.index(s)] > 0 else 1.0 for s in specs}


def _capacities(table) -> list[tuple[str, int]]:
    """(label, total bits) of every budget the mixed stage measures: uniform sizes and MIXED_BUDGETS."""
    from workbench.allocate import budget_to_bits
    from workbench.plan import plan_totals
    from workbench.verify import uniform_plans

    caps = {
        f"= {s}": plan_totals(r, table.layers).total_bits
        for s, r in uniform_plans(table, table.layers).items()
    }
    caps.update({f"{b} bits": budget_to_bits(table.layers, budget_bits=b) for b in MIXED_BUDGETS})
    return sorted(caps.items(), key=lambda kv: kv[1])


def refine_table(
    loaded, table, windows: torch.Tensor, grams: dict, rounds: int = MIXED_ROUNDS, on_step=None
) -> dict:
    """The mixed stage (module doc), after `calibrate_table`: measure the allocator's plans at every
    uniform size and standard budget, refit the per-spec scales on all measured plans, repeat `rounds`
    times, then measure the final allocations once more. Costs in `table` are rescaled in place.

    Returns the calibration record: {"uniform": ..., "scales": {spec: scale vs the raw cost}, "plans":
    [{"label", "round", "specs", "kl", "total_bits", "predicted"}], "rounds": [{"round", "spearman",
    "max_rel_error"}]}. `on_step(i, n, label)` is called before each measurement (n is an upper bound).
    """
    from workbench.allocate import allocate_table
    from workbench.errors import WorkbenchError
    from workbench.plan import Plan
    from workbench.replay import BlockRunner

    record = table.calibration
    uniform = record["uniform"]
    layers = table.layers
    raw = {
        x.name: {s: c / uniform.get(s, {}).get("scale", 1.0) for s, c in table.cost[x.name].items()}
        for x in layers
    }
    plans = [
        {"label": f"uniform {s}", "round": 0, "specs": [s] * len(layers), "kl": u["measured"],
         "total_bits": None, "predicted": u["measured"]}
        for s, u in uniform.items()
    ]  # fmt: skip
    for p in plans:
        p["total_bits"] = _bits(Plan(default=p["specs"][0]).resolve(layers), layers)
    seen = {tuple(p["specs"]) for p in plans}
    runner = BlockRunner(loaded.model)
    runner.capture(windows)
    caps = _capacities(table)
    n_steps, step = len(caps) * (rounds + 1), 0
    history = []
    for r in range(rounds + 1):
        for label, bits in caps:
            try:
                alloc = allocate_table(table, budget_mb=bits / 8e6, guard=False)
            except WorkbenchError:  # a budget below the smallest plan of this model
                continue
            key = tuple(str(alloc.resolved[x.name]) for x in layers)
            step += 1
            if key in seen:
                continue
            if on_step is not None:
                on_step(step - 1, n_steps, f"allocation {label} (round {r + 1})")
            seen.add(key)
            kl = plan_kl(loaded, runner, alloc.resolved, grams)
            plans.append(
                {"label": f"allocated {label}", "round": r + 1, "specs": list(key), "kl": kl,
                 "total_bits": alloc.total_bits, "predicted": alloc.predicted_cost}
            )  # fmt: skip
        history.append({"round": r + 1, **_agreement(plans, raw, layers, table)})
        if r == rounds:
            break
        scales = fit_scales(raw, plans, layers, table.specs)
        for x in layers:
            for s in table.cost[x.name]:
                table.cost[x.name][s] = raw[x.name][s] * scales.get(s, 1.0)
        record["scales"] = scales
    record.update(plans=plans, rounds=history)
    return record


def _bits(resolved, layers) -> int:
    from workbench.plan import plan_totals

    return plan_totals(resolved, layers).total_bits


def _agreement(plans, raw, layers, table) -> dict:
    """Spearman(predicted with the current costs, measured) and the worst relative error over `plans`."""
    from scipy.stats import spearmanr

    pred = [sum(table.cost[x.name].get(s, 0.0) for x, s in zip(layers, p["specs"])) for p in plans]
    kl = [p["kl"] for p in plans]
    rel = max(abs(a / b - 1) for a, b in zip(pred, kl))
    return {
        "spearman": float(spearmanr(pred, kl).statistic),
        "max_rel_error": float(rel),
        "n_plans": len(plans),
    }
