"""Budget-optimal mixed precision: exact multiple-choice knapsack over a sensitivity table, Pareto front.

Problem (multiple-choice knapsack, MCKP): every layer i takes exactly one spec j, costing c_ij (the
sensitivity: predicted loss increase, assumed additive over layers) and w_ij storage bits (exact integers,
`QuantSpec.storage_bits`). Minimise sum c_ij subject to sum w_ij <= budget.

Solvers, both exact (no greedy heuristic):
- `dp`: dynamic programming over total bits. Bits are integers, so after subtracting each layer's cheapest
  option and dividing by the gcd g of all option sizes the table is exact; it is used when that grid is
  small (tests, small models). Memory is layers x grid cells.
- `ilp`: the same problem as a 0/1 integer program solved by HiGHS branch-and-bound
  (`scipy.optimize.milp`, relative gap 0). Used for real models, where the exact bit grid has ~10^7 cells
  (SmolLM2: g = 32 bits, 57M cells). The returned choice is re-checked exactly against the budget in integers.
Before solving, options dominated within a layer (no smaller and no cheaper) are dropped: this never changes
the optimum.

The Pareto front (total size vs summed cost, over all plans) is computed exactly by merging per-layer
option lists and discarding dominated partial sums (Nemhauser-Ullmann style). For plotting it can be
thinned to at most `max_points` points (`thin`): thinned points are still exact optimal plans' sizes/costs
of the exact front, just fewer of them.

Reference: Sinha & Zoltners, "The multiple-choice knapsack problem", Operations Research 27 (1979).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from workbench.errors import WorkbenchError
from workbench.model.inventory import LayerInfo
from workbench.plan.plan import Plan, ResolvedPlan, match_layers, plan_totals
from workbench.quant.spec import QuantSpec

DP_MAX_CELLS = 20_000_000  # layers x grid cells for the DP path
# The guard replaces the allocator's plan only when it is worse by more than this fraction (a smaller
# difference on the few calibration windows is within their noise).
GUARD_MARGIN = 0.02
# Two measurements on the same scan windows closer than this are a tie (the refinement's ACCEPT_MARGIN):
# the guard keeps the allocator's own plan then. On stories260K at the int6_g128 size the allocator's plan
# measured +0.5% on the scan windows and -1.9% on the evaluation text against uniform int6_g128.
TIE_MARGIN = 0.01


# ---------------------------------------------------------------------- the knapsack on plain arrays
def _undominated(costs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Indices of options not dominated by another option of the same item (ties keep the first)."""
    order = np.lexsort((costs, weights))  # by weight, then cost
    keep, best = [], math.inf
    for j in order:
        if costs[j] < best:
            keep.append(int(j))
            best = costs[j]
    return np.array(sorted(keep), dtype=np.int64)


def _solve_dp(costs, weights, capacity: int) -> list[int] | None:
    n = len(costs)
    base = [int(w.min()) for w in weights]
    cap = capacity - sum(base)
    if cap < 0:
        return None
    extra = [w - b for w, b in zip(weights, base)]
    g = 0
    for e in extra:
        for v in e:
            g = math.gcd(g, int(v))
    g = g or 1
    cells = min(cap // g, sum(int(e.max()) // g for e in extra)) + 1
    best = np.full(cells, np.inf)
    best[0] = 0.0
    choice = np.zeros((n, cells), dtype=np.int16)
    for i in range(n):
        new = np.full(cells, np.inf)
        for j, (c, e) in enumerate(zip(costs[i], extra[i])):
            s = int(e) // g
            if s >= cells:
                continue
            cand = np.full(cells, np.inf)
            cand[s:] = best[: cells - s] + c
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        best = new
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        return None
    picks = [0] * n
    for i in range(n - 1, -1, -1):
        j = int(choice[i, end])
        picks[i] = j
        end -= int(extra[i][j]) // g
    assert end == 0, "DP backtrack did not return to the empty knapsack"
    return picks


@contextlib.contextmanager
def _c_stdout_to_stderr():
    """Send what native code writes to file descriptor 1 to fd 2 while the block runs.

    HiGHS prints stray debug lines ("HighsMipSolverData::transformNewIntegerFeasibleSolution ...",
    ERGO-Code/HiGHS#2783) straight to fd 1, which would corrupt `workbench allocate --json` output.
    The redirection is process-wide: whatever other threads write to fd 1 meanwhile lands on stderr too.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no usable fd 1 (some embedded interpreters): nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve_ilp(costs, weights, capacity: int) -> list[int] | None:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    n = len(costs)
    sizes = [len(c) for c in costs]
    offs = np.concatenate([[0], np.cumsum(sizes)])
    c = np.concatenate(costs).astype(np.float64)
    w = np.concatenate(weights).astype(np.int64)
    g = int(np.gcd.reduce(w)) or 1
    ws = (w // g).astype(np.float64)
    # Scale the objective so HiGHS's absolute tolerances are negligible against cost differences.
    span = float(np.abs(c).max()) or 1.0
    cs = c / span * 1e6
    rows = np.repeat(np.arange(n), sizes)
    a_eq = coo_matrix((np.ones(len(c)), (rows, np.arange(len(c)))), shape=(n, len(c)))
    cap_units = capacity // g
    for _ in range(3):
        with _c_stdout_to_stderr():
            res = milp(
                cs,
                integrality=np.ones(len(c)),
                bounds=Bounds(0, 1),
                constraints=[LinearConstraint(a_eq, 1, 1), LinearConstraint(ws[None, :], -np.inf, cap_units)],
                options={"mip_rel_gap": 0.0, "presolve": True},
            )
        if res.x is None:
            return None
        picks = [int(np.argmax(res.x[offs[i] : offs[i + 1]])) for i in range(n)]
        used = sum(int(weights[i][p]) for i, p in enumerate(picks))
        if used <= capacity:
            return picks
        cap_units -= 1  # solver tolerance let the knapsack row slip by a fraction: tighten and resolve
    raise AssertionError("ILP solution kept exceeding the budget")


def solve_mckp(costs: list, weights: list, capacity: int, method: str = "auto") -> list[int] | None:
    """Exact multiple-choice knapsack: one option per item, min total cost with total weight <= capacity.

    Args:
        costs: per item, a float array [n_options_i].
        weights: per item, an integer array [n_options_i] (bits).
        capacity: integer budget (bits).
        method: "dp", "ilp" or "auto" (dp when the exact grid is small, else ilp).
    Returns:
        the chosen option index per item, or None when even the smallest options exceed the capacity.
    """
    costs = [np.asarray(c, dtype=np.float64) for c in costs]
    weights = [np.asarray(w, dtype=np.int64) for w in weights]
    assert all(len(c) == len(w) and len(c) > 0 for c, w in zip(costs, weights)), "costs/weights mismatch"
    keep = [_undominated(c, w) for c, w in zip(costs, weights)]
    rc = [c[k] for c, k in zip(costs, keep)]
    rw = [w[k] for w, k in zip(weights, keep)]
    if sum(int(w.min()) for w in rw) > capacity:
        return None
    if method == "auto":
        g = int(np.gcd.reduce(np.concatenate([w - w.min() for w in rw]))) or 1
        grid = min(capacity, sum(int(w.max() - w.min()) for w in rw)) // g + 1
        method = "dp" if grid * len(rw) <= DP_MAX_CELLS else "ilp"
    if method == "dp":
        picks = _solve_dp(rc, rw, capacity)
    elif method == "ilp":
        picks = _solve_ilp(rc, rw, capacity)
    else:
        raise ValueError(f"unknown method {method!r}")
    return None if picks is None else [int(k[p]) for k, p in zip(keep, picks)]


def pareto_merge(costs: list, weights: list) -> tuple[np.ndarray, np.ndarray]:
    """Exact Pareto front of (total weight, total cost) over all choices: arrays sorted by weight,
    cost strictly decreasing. Partial sums dominated after each item are dropped (exact)."""
    fw = np.zeros(1, dtype=np.int64)
    fc = np.zeros(1, dtype=np.float64)
    for c, w in zip(costs, weights):
        c = np.asarray(c, dtype=np.float64)
        w = np.asarray(w, dtype=np.int64)
        k = _undominated(c, w)
        cw = (fw[:, None] + w[k][None, :]).ravel()
        cc = (fc[:, None] + c[k][None, :]).ravel()
        order = np.lexsort((cc, cw))
        cw, cc = cw[order], cc[order]
        run = np.minimum.accumulate(cc)
        keep = np.ones(len(cc), dtype=bool)
        keep[1:] = cc[1:] < run[:-1]
        fw, fc = cw[keep], cc[keep]
    return fw, fc


# ---------------------------------------------------------------------- tables, budgets, plans
@dataclass
class Allocation:
    """The result of `allocate_table`: the plan and what the allocator predicted for it."""

    plan: Plan
    resolved: ResolvedPlan  # layer -> spec, the same as plan.resolve(layers)
    predicted_cost: float
    total_bits: int
    budget_bits: int
    avg_bits: float
    mb: float
    measured: float | None = None  # KL measured on the calibration windows, when the table holds this plan
    note: str = ""  # set when the guard replaced the allocator's plan by a measured better one
    evidence: str = ""  # what was measured: this plan's KL beside the best uniform plan that fits
    wins: bool = False  # measured strictly below every measured uniform plan that fits (scan windows)


def candidate_options(table, include_bf16: bool) -> list[str]:
    """The allocator's options: the table's specs (canonical strings), bf16 appended when allowed."""
    specs = [str(QuantSpec.parse(s)) for s in table.specs]
    if include_bf16 and "bf16" not in specs:
        specs.append("bf16")
    return specs


def layer_cost(table, layer: str, spec: str) -> float:
    """The table's predicted cost of `layer` at `spec` (bf16 / fp16 cost 0 unless scanned)."""
    if spec in ("bf16", "fp16") and spec not in table.cost.get(layer, {}):
        return 0.0
    try:
        return float(table.cost[layer][spec])
    except KeyError:
        raise WorkbenchError(
            f"sensitivity table has no cost for layer {layer} x {spec} (incomplete scan? "
            "re-run `workbench sensitivity` to finish it)"
        ) from None


def resolve_pins(pinned: dict[str, str] | None, layers: list[LayerInfo]) -> dict[str, QuantSpec]:
    """Pins {match: spec} (exact name, `re:` or `role:`, later entries win) -> {layer: QuantSpec}."""
    out: dict[str, QuantSpec] = {}
    for match, spec in (pinned or {}).items():
        names = match_layers(match, layers)
        if not names:
            raise WorkbenchError(f"pin '{match}' matches no layer of the sensitivity table")
        q = QuantSpec.parse(spec)
        for name in names:
            out[name] = q
    return out


def budget_to_bits(
    layers: list[LayerInfo], budget_bits: float | None = None, budget_mb: float | None = None
) -> int:
    """Total-bit capacity for a budget in average bits per weight (over `layers`) or in MB (10^6 bytes)."""
    if (budget_bits is None) == (budget_mb is None):
        raise WorkbenchError("give exactly one budget: average bits per weight or MB")
    if budget_bits is not None:
        if not budget_bits > 0:
            raise WorkbenchError(f"budget {budget_bits} bits/weight must be positive")
        if budget_bits > 16:
            raise WorkbenchError(
                f"budget {budget_bits} bits/weight is above 16 (bf16 for every layer): nothing to "
                "allocate (a budget in MB? choose MB)"
            )
        return int(math.floor(budget_bits * sum(x.n_params for x in layers) + 1e-6))
    if not budget_mb > 0:
        raise WorkbenchError(f"budget {budget_mb} MB must be positive")
    return int(math.floor(budget_mb * 8e6 + 1e-6))


def allocate_table(
    table,
    budget_bits: float | None = None,
    budget_mb: float | None = None,
    pinned: dict[str, str] | None = None,
    include_bf16: bool = True,
    method: str = "auto",
    guard: bool = True,
) -> Allocation:
    """Choose one spec per layer of `table` minimising the summed cost under the budget (exact MCKP).

    Args:
        table: a `SensitivityTable` (layers, specs, cost[layer][spec]).
        budget_bits / budget_mb: the budget, as average bits per weight over the table's layers or in MB.
        pinned: {match: spec} fixed before allocation (their storage counts against the budget).
        include_bf16: also allow keeping a layer in bf16 at cost 0.
        guard: when the table holds measured plans (`calibrate.refine_table`) and no layer is pinned,
            never return a plan that measured (or, unmeasured, is predicted) higher KL than a measured plan
            that fits in the budget: that plan is returned instead, and `note` says so.
    """
    layers = table.layers
    capacity = budget_to_bits(layers, budget_bits, budget_mb)
    pins = resolve_pins(pinned, layers)
    options = candidate_options(table, include_bf16)
    parsed = {s: QuantSpec.parse(s) for s in options}
    free = [x for x in layers if x.name not in pins]
    fixed_bits = sum(
        pins[x.name].storage_bits(x.out_features, x.in_features) for x in layers if x.name in pins
    )
    costs = [[layer_cost(table, x.name, s) for s in options] for x in free]
    weights = [[parsed[s].storage_bits(x.out_features, x.in_features) for s in options] for x in free]
    picks = solve_mckp(costs, weights, capacity - fixed_bits, method=method) if free else []
    if picks is None or fixed_bits > capacity:
        smallest = fixed_bits + sum(min(w) for w in weights)
        n = sum(x.n_params for x in layers)
        raise WorkbenchError(
            f"budget of {capacity / n:.3f} bits/weight ({capacity / 8e6:.2f} MB) is below the "
            f"smallest plan possible with specs {', '.join(options)} and the pins "
            f"({smallest / n:.3f} bits/weight, {smallest / 8e6:.2f} MB)"
        )
    resolved: dict[str, QuantSpec] = {}
    cost = 0.0
    pick_of = {x.name: p for x, p in zip(free, picks)}
    for x in layers:
        if x.name in pins:
            resolved[x.name] = pins[x.name]
            if str(pins[x.name]) in table.cost.get(x.name, {}):
                cost += float(table.cost[x.name][str(pins[x.name])])
        else:
            s = options[pick_of[x.name]]
            resolved[x.name] = parsed[s]
            cost += layer_cost(table, x.name, s)
    measured, note = None, ""
    if guard and not pins:
        resolved, cost, measured, note = _guard(table, resolved, cost, capacity, include_bf16)
    totals = plan_totals(resolved, layers)
    assert totals.total_bits <= capacity, "allocation exceeds its budget"
    specs = [str(resolved[x.name]) for x in layers]
    evidence = measured_evidence(table, specs, capacity)
    meta = {
        "allocated_by": "workbench.allocate",
        "method": getattr(table, "method", "?"),
        "budget_bits_total": capacity,
        "budget_avg_bits": capacity / totals.n_weights,
        "avg_bits": totals.avg_bits,
        "mb": totals.mb,
        "predicted_cost": cost,
        "specs": options,
        "pinned": {k: str(v) for k, v in (pinned or {}).items()},
    }
    if note:
        meta["guard"] = note
    return Allocation(
        plan=Plan.from_resolved(resolved, meta=meta),
        resolved=ResolvedPlan(resolved, layers),
        predicted_cost=cost,
        total_bits=totals.total_bits,
        budget_bits=capacity,
        avg_bits=totals.avg_bits,
        mb=totals.mb,
        measured=measured,
        note=note,
        evidence=evidence,
        wins=measured_wins(table, specs, capacity),
    )


def _pool(table) -> list[dict]:
    """The table's measured whole plans (`calibrate.refine_table`), or []."""
    c = table.calibration
    return (c.get("plans") or []) if isinstance(c, dict) else []


def mixture_factor(plans: list[dict]) -> float:
    """How much the table under-prices the allocator's mixtures: the geometric mean of measured / predicted
    KL over the allocator's own measured plans in the pool (labels "allocated ..."; at least 1, 1 without
    any). Refinement moves stay close to a uniform plan and are priced better, so they do not count."""
    ratios = [p["kl"] / p["predicted"] for p in plans if p["label"].startswith("allocated ")
              and p["kl"] > 0 and p.get("predicted", 0) > 0]  # fmt: skip
    return max(1.0, math.exp(sum(math.log(r) for r in ratios) / len(ratios))) if ratios else 1.0


def _guard(table, resolved: dict, cost: float, capacity: int, include_bf16: bool):
    """(resolved, cost, measured KL or None, note): the allocator's plan, or the best measured plan of the
    table (`calibration["plans"]`, KL on the calibration windows) that fits in `capacity` when it is better:
    measured lower by TIE_MARGIN than the allocator's plan when that one was measured too, else lower by
    GUARD_MARGIN than the allocator's prediction times `mixture_factor` (the measured under-pricing)."""
    plans = _pool(table)
    if not plans:
        return resolved, cost, None, ""
    layers = table.layers
    key = [str(resolved[x.name]) for x in layers]
    mine = next((p for p in plans if p["specs"] == key), None)
    own = mine["kl"] if mine else cost * mixture_factor(plans)
    fit = [
        p
        for p in plans
        if p["total_bits"] <= capacity and (include_bf16 or "bf16" not in p["specs"]) and p is not mine
    ]
    best = min(fit, key=lambda p: p["kl"], default=None)
    margin = TIE_MARGIN if mine else GUARD_MARGIN
    if best is None or best["kl"] * (1 + margin) >= own:
        return resolved, cost, None if mine is None else mine["kl"], ""
    how = "measured" if mine else "is predicted (x the measured under-pricing of mixtures) at"
    note = (
        f"the allocator's plan {how} KL {own:.4g} on the calibration windows, above {best['label']} "
        f"(measured {best['kl']:.4g}, fits the budget): returning {best['label']}"
    )
    new = {x.name: QuantSpec.parse(s) for x, s in zip(layers, best["specs"])}
    price = sum(layer_cost(table, x.name, s) for x, s in zip(layers, best["specs"]))
    return new, price, best["kl"], note


def measured_wins(table, specs: list[str], capacity: int) -> bool:
    """Whether the pool measured the plan `specs` strictly below every uniform plan that fits in `capacity`
    bits (False when it was not measured or no uniform plan fits)."""
    plans = _pool(table)
    mine = next((p for p in plans if p["specs"] == specs), None)
    uni = [p["kl"] for p in plans if p["label"].startswith("uniform ") and p["total_bits"] <= capacity]
    return mine is not None and bool(uni) and mine["kl"] < min(uni)


def measured_evidence(table, specs: list[str], capacity: int) -> str:
    """One line: the KL the pool measured for the plan `specs` (spec per table layer) beside the best
    uniform plan that fits in `capacity` bits, with the margin; "" when the plan was not measured."""
    plans = _pool(table)
    mine = next((p for p in plans if p["specs"] == specs), None)
    if mine is None:
        return ""
    st = table.settings
    where = f"{st.get('n_seqs', '?')} x {st.get('seq_len', '?')} tokens of '{st.get('text', '?')}'"
    uni = [p for p in plans if p["label"].startswith("uniform ") and p["total_bits"] <= capacity]
    best = min(uni, key=lambda p: p["kl"], default=None)
    line = f"measured KL {mine['kl']:.4g} on the scan windows ({where}; {mine['label']})"
    if best is None:
        return line + "; no uniform plan fits"
    if best is mine:
        return line + "; it is the best uniform plan that fits (no mixed plan measured lower)"
    margin = mine["kl"] / best["kl"] - 1
    return line + f"; best uniform plan that fits: {best['label']} {best['kl']:.4g} ({100 * margin:+.1f}%)"


def allocate(
    table,
    budget_bits: float | None = None,
    budget_mb: float | None = None,
    pinned: dict[str, str] | None = None,
    include_bf16: bool = True,
) -> Plan:
    """`allocate_table(...).plan` (the ARCHITECTURE.md contract)."""
    return allocate_table(table, budget_bits, budget_mb, pinned, include_bf16).plan


@dataclass
class ParetoPoint:
    avg_bits: float
    mb: float
    cost: float


def thin(points: list[ParetoPoint], max_points: int) -> list[ParetoPoint]:
    """At most `max_points` points of a front, evenly spread in size, both ends kept."""
    if len(points) <= max_points:
        return points
    idx = np.unique(np.linspace(0, len(points) - 1, max_points).round().astype(int))
    return [points[i] for i in idx]


def pareto_front(
    table, pinned: dict[str, str] | None = None, include_bf16: bool = True, max_points: int | None = 500
) -> list[ParetoPoint]:
    """The exact size-vs-predicted-cost Pareto front of all plans over `table` (pins respected).

    Points are sorted by size with strictly decreasing cost; `max_points` thins the list for plotting
    (None keeps every point). Get the plan at a point with `allocate_table(table, budget_mb=p.mb, ...)`.
    """
    layers = table.layers
    pins = resolve_pins(pinned, layers)
    options = candidate_options(table, include_bf16)
    parsed = {s: QuantSpec.parse(s) for s in options}
    n = sum(x.n_params for x in layers)
    fixed_bits, fixed_cost = 0, 0.0
    costs, weights = [], []
    for x in layers:
        if x.name in pins:
            fixed_bits += pins[x.name].storage_bits(x.out_features, x.in_features)
            fixed_cost += float(table.cost.get(x.name, {}).get(str(pins[x.name]), 0.0))
        else:
            costs.append([layer_cost(table, x.name, s) for s in options])
            weights.append([parsed[s].storage_bits(x.out_features, x.in_features) for s in options])
    fw, fc = pareto_merge(costs, weights)
    pts = [
        ParetoPoint(
            avg_bits=(int(b) + fixed_bits) / n, mb=(int(b) + fixed_bits) / 8e6, cost=float(c) + fixed_cost
        )
        for b, c in zip(fw, fc)
    ]
    return pts if max_points is None else thin(pts, max_points)
