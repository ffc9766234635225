"""Calibrating a sensitivity table on measured whole plans: uniform plans first, then the allocator's own.

A Fisher-weighted cost is a second-order estimate of the KL of quantizing one layer alone. Summed over
layers it ranks plans of one spec well, but its error depends on the spec: small perturbations (int8, int6,
4-bit) are over-estimated, large ones (3-bit, 2-bit) under-estimated, since KL grows faster than quadratically
once the error is large. An allocator fed such a table prefers the under-estimated specs, and a mixed plan
can then measure worse than the uniform plan of the same size (see benchmarks/RESULTS.md, "Plans you can
trust").

Stages, all measured on the scan windows from the cached reference of `replay.BlockRunner` (one forward
pass per plan, all its layers fake-quantized):

1. `calibrate_table` ("uniform"): the KL of the uniform plan of every spec; that spec's costs are multiplied
   by measured / predicted, so the table predicts every uniform plan exactly.
2. `refine_table` ("check", the default): the allocator's own plans at every uniform plan's size and at
   CHECK_BUDGETS are measured too and kept beside the uniform plans. Per-spec scales still price such
   mixtures ~2.4x too low on `default` (the allocator picks exactly the layers whose cost is
   under-estimated), so the prediction alone cannot promise that a mixture beats the uniform plan of its
   size; the measurements can.
   Then the measured refinement (`refine_plans`, `refine.py`, part of "check"): at each of those budgets
   where the best measured plan does not already beat every fitting uniform plan by a margin, small moves
   ranked by the table are measured and kept only if lower; they join the pool, so the allocation at a
   uniform plan's size can beat it strictly even where the whole knapsack mixture measures worse.
3. `refine_table(roles=True)` ("roles", optional): before the check, each role is measured alone (its
   layers at ROLE_SPECS, the rest unquantized), its costs get the factor b_role = measured / estimated
   (geometric mean over those specs), and the per-spec scales are refitted so every uniform plan stays
   exact: cost = raw x b_role x a_spec. On `default` the Fisher estimate is ~4.5x high for down_proj and
   ~2x high for k/v relative to gate/up/o/q/lm_head, and the roles are close to additive (the eight
   nf4_g64 role plans sum to 0.382 against 0.363 for the whole uniform plan) -- yet the allocations it
   gives measured worse at 5 of 8 checked sizes (benchmarks/RESULTS.md), so it is not the default.

Every measured whole plan is kept in the table (`table.calibration["plans"]`: its spec per layer and its
KL), so the allocator can refuse to return a plan that measured worse than another one that fits in the
same budget (`allocate.allocate_table`'s guard). Measured feedback on whole configurations in the search
is the idea of HAQ (Wang et al. 2019, https://arxiv.org/abs/1811.08886); the role factors are measured
here, not assumed.
"""

from __future__ import annotations

import math

import torch

ROLE_SPECS = ("int4_g128", "int3_g32")  # the specs each role is measured at alone (those in the table)
CHECK_BUDGETS = (3.0, 3.5, 4.0, 4.5, 5.0)  # average bits per weight checked besides the uniform sizes


def uniform_kls(loaded, table, windows: torch.Tensor, grams: dict, on_spec=None) -> dict[str, float]:
    """{spec: mean KL(P_ref || P_q)} of the uniform plan of each table spec on `windows` [n, L].

    Specs that cannot apply to every layer are left out. `on_spec(i, n, spec)` is called before each.
    """
    from workbench.errors import WorkbenchError
    from workbench.measure.replay import BlockRunner
    from workbench.plan.plan import Plan

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


def plan_kl(loaded, runner, resolved: dict, grams: dict, cache: dict | None = None) -> float:
    """Mean KL of the whole plan `resolved` ({layer: spec}) on the windows `runner` captured.

    `cache` ({(layer, spec): W_hat}): reuse the quantized weights of the previous plan; entries this plan
    does not use are dropped, so it holds one plan's weights at most.
    """
    from workbench.measure.simulate import quantized_weight
    from workbench.quant.spec import QuantSpec

    specs = {n: QuantSpec.parse(s) for n, s in resolved.items()}
    keys = {(n, str(s)) for n, s in specs.items() if s.is_quantized}
    if cache is None:
        cache = {}
    for k in [k for k in cache if k not in keys]:
        del cache[k]
    for n, s in keys:
        if (n, s) not in cache:
            cache[(n, s)] = quantized_weight(loaded.model, n, s, grams)
    return runner.kl_from(0, {n: cache[(n, s)] for n, s in keys})


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


# ---------------------------------------------------------------------- the role stage
def role_scales(loaded, runner, table, raw: dict, grams: dict, specs, on_step=None) -> dict[str, dict]:
    """{role: {"scale": b_r, "plans": {spec: {"measured", "raw"}}}}: the KL of the plan that quantizes only
    the layers of one role (at each of `specs`; the rest stay unquantized) against that role's summed raw
    cost; b_r is the geometric mean of measured / raw over `specs`."""
    roles = sorted({x.role for x in table.layers})
    out = {}
    for i, role in enumerate(roles):
        names = [x.name for x in table.layers if x.role == role]
        plans, logs = {}, []
        for spec in specs:
            if on_step is not None:
                on_step(i, len(roles), f"role {role} at {spec}")
            kl = plan_kl(loaded, runner, dict.fromkeys(names, spec), grams)
            r = sum(raw[n][spec] for n in names)
            plans[spec] = {"measured": kl, "raw": r}
            if kl > 0 and r > 0:
                logs.append(math.log(kl / r))
        out[role] = {"scale": math.exp(sum(logs) / len(logs)) if logs else 1.0, "plans": plans}
    return out


def _capacities(table) -> list[tuple[str, int]]:
    """(label, total bits) of every budget the check measures: uniform sizes and CHECK_BUDGETS."""
    from workbench.measure.verify import uniform_plans
    from workbench.plan.allocate import budget_to_bits
    from workbench.plan.plan import plan_totals

    caps = {
        f"= {s}": plan_totals(r, table.layers).total_bits
        for s, r in uniform_plans(table, table.layers).items()
    }
    caps.update({f"{b} bits": budget_to_bits(table.layers, budget_bits=b) for b in CHECK_BUDGETS})
    return sorted(caps.items(), key=lambda kv: kv[1])


def refine_table(
    loaded, table, windows: torch.Tensor, grams: dict, roles: bool = False, on_step=None
) -> dict:
    """The check (and, with `roles`, the role stage) of the module doc, after `calibrate_table`: with
    `roles`, costs in `table` are rescaled in place to raw x b_role x a_spec; then the allocator's plans at
    every uniform size and CHECK_BUDGETS are measured.

    Returns the calibration record: {"uniform": ..., "roles": {role: {"scale", "plans"}}, "scales":
    {spec: a_spec}, "plans": [{"label", "specs", "kl", "total_bits", "predicted"}] (uniform plans and the
    checked allocations, then the refinement's moves: the guard's pool), "refined": [per budget refined:
    {"label", "total_bits", "start", "start_kl", "kl", "evals", "kept", "moves"}] (`refine_plans`),
    "check": {"spearman", "max_rel_error", "n_plans"}}.
    `on_step(i, n, label)` is called before each measurement.
    """
    from workbench.errors import WorkbenchError
    from workbench.measure.replay import BlockRunner
    from workbench.plan.allocate import allocate_table

    record = table.calibration
    uniform = record["uniform"]
    layers = table.layers
    raw = {x.name: {s: c / uniform[s]["scale"] for s, c in table.cost[x.name].items()} for x in layers}
    runner = BlockRunner(loaded.model)
    runner.capture(windows)
    if roles:
        refs = [s for s in ROLE_SPECS if s in uniform] or list(uniform)[:1]
        roles = role_scales(loaded, runner, table, raw, grams, refs, on_step)
        b = {x.name: roles[x.role]["scale"] for x in layers}
    else:
        roles, b = {}, dict.fromkeys((x.name for x in layers), 1.0)
    scales = {}
    for s, u in uniform.items():
        predicted = sum(b[x.name] * raw[x.name][s] for x in layers)
        scales[s] = u["measured"] / predicted if predicted > 0 else 1.0
    for x in layers:
        for s in table.cost[x.name]:
            table.cost[x.name][s] = raw[x.name][s] * b[x.name] * scales.get(s, 1.0)
    plans = [
        {"label": f"uniform {s}", "specs": [s] * len(layers), "kl": u["measured"], "predicted": u["measured"],
         "total_bits": _bits({x.name: s for x in layers}, layers)}
        for s, u in uniform.items()
    ]  # fmt: skip
    seen = {tuple(p["specs"]) for p in plans}
    caps = _capacities(table)
    for i, (label, bits) in enumerate(caps):
        try:
            alloc = allocate_table(table, budget_mb=bits / 8e6, guard=False)
        except WorkbenchError:  # a budget below the smallest plan of this model
            continue
        key = tuple(str(alloc.resolved[x.name]) for x in layers)
        if key in seen:
            continue
        if on_step is not None:
            on_step(i, len(caps), f"check: allocation {label}")
        seen.add(key)
        kl = plan_kl(loaded, runner, alloc.resolved, grams)
        plans.append(
            {"label": f"allocated {label}", "specs": list(key), "kl": kl, "total_bits": alloc.total_bits,
             "predicted": alloc.predicted_cost}
        )  # fmt: skip
    if roles:
        record["roles"] = roles
    record.update(scales=scales, plans=plans, check=_agreement(plans))
    refine_plans(loaded, table, windows, grams, on_step=on_step, runner=runner)
    return record


def refine_plans(loaded, table, windows, grams: dict, on_step=None, runner=None) -> list[dict]:
    """Measured refinement (`refine.py`) at every budget the check measured, after the check: every
    measured move joins the pool (`calibration["plans"]`); the record per budget is kept under
    "refined" and the check's agreement is recomputed over the larger pool. `on_step(i, n, label)` is
    called before each measurement (it may raise to cancel)."""
    from workbench.measure.refine import MAX_EVALS, refine_pool

    record = table.calibration
    if runner is None:
        from workbench.measure.replay import BlockRunner

        runner = BlockRunner(loaded.model)
        runner.capture(windows)
    caps = _capacities(table)
    measure = _measurer(loaded, runner, table, grams)

    def step(i: int, label: str, move: int, n_up: int) -> None:
        if on_step is not None:
            on_step(i, len(caps), f"refine {label}: move {move + 1}/{MAX_EVALS} ({n_up} layers up)")

    refined = refine_pool(table, record["plans"], caps, measure, on_step=step)
    record.update(refined=refined, check=_agreement(record["plans"]))
    return refined


def _measurer(loaded, runner, table, grams: dict):
    """specs (one per table layer, in order) -> the plan's mean KL on the windows `runner` captured, reusing
    the previous plan's quantized weights (`plan_kl`'s cache)."""
    cache: dict = {}

    def measure(specs: list[str]) -> float:
        return plan_kl(loaded, runner, {x.name: s for x, s in zip(table.layers, specs)}, grams, cache)

    return measure


def _bits(resolved, layers) -> int:
    from workbench.plan.plan import plan_totals

    return plan_totals(resolved, layers).total_bits


def _agreement(plans) -> dict:
    """Spearman(predicted, measured) and the worst relative error of the prediction over `plans`."""
    from scipy.stats import spearmanr

    pred, kl = [p["predicted"] for p in plans], [p["kl"] for p in plans]
    rel = max(abs(a / b - 1) for a, b in zip(pred, kl))
    return {
        "spearman": float(spearmanr(pred, kl).statistic),
        "max_rel_error": float(rel),
        "n_plans": len(plans),
    }


def refine_allocation(
    loaded, table, budget_bits: float | None = None, budget_mb: float | None = None, max_evals: int = 2,
    grams: dict | None = None, progress=False,
):  # fmt: skip
    """`allocate_table` at a budget the check did not measure, refined by measurement first: the allocator's
    plan is measured on the scan windows, then `refine.refine` runs from the best measured plan that fits (at
    most `max_evals` moves); every measured plan joins the table's pool (save the table to keep them), and
    the result is `allocate_table` over the larger pool. Nothing is measured when the pool already holds the
    allocator's plan. `progress`: a callable fn(fraction, text) (it may raise to cancel) or False."""
    from workbench.measure.refine import Prices, refine
    from workbench.measure.replay import BlockRunner
    from workbench.model.data import calibration_batches
    from workbench.plan.allocate import allocate_table

    plans = table.calibration.get("plans")
    first = allocate_table(table, budget_bits=budget_bits, budget_mb=budget_mb)
    key = [str(first.resolved[x.name]) for x in table.layers]
    if not plans or any(p["specs"] == key for p in plans):
        return first
    say = progress if callable(progress) else (lambda _f, _t: None)
    st = table.settings
    say(0.0, f"measuring the allocation on {st['n_seqs']} x {st['seq_len']} tokens of '{st['text']}'")
    windows = calibration_batches(
        loaded.tokenizer, st["text"], st["n_seqs"], st["seq_len"], st["seed"],
        max_context=loaded.description.max_context,
    )  # fmt: skip
    runner = BlockRunner(loaded.model)
    runner.capture(windows)
    measure = _measurer(loaded, runner, table, grams or {})

    raw = allocate_table(table, budget_bits=budget_bits, budget_mb=budget_mb, guard=False)
    own = [str(raw.resolved[x.name]) for x in table.layers]
    label = f"allocated {raw.avg_bits:.3f} bits"
    if not any(p["specs"] == own for p in plans):
        plans.append({"label": label, "specs": own, "kl": measure(own), "total_bits": raw.total_bits,
                      "predicted": raw.predicted_cost})  # fmt: skip
    start = min((p for p in plans if p["total_bits"] <= raw.budget_bits), key=lambda p: p["kl"])
    prices = Prices.of(table)

    def step(i: int, n_up: int) -> None:
        say((i + 1) / (max_evals + 1), f"refining: move {i + 1}/{max_evals} ({n_up} layers up)")

    r = refine(prices, start, raw.budget_bits, measure, max_evals, on_move=step)
    for j, m in enumerate(r.moves):
        if not any(p["specs"] == m["specs"] for p in plans):
            bits = prices.total_bits(m["specs"])
            plans.append({"label": f"refined {label} #{j + 1}", "specs": m["specs"], "kl": m["kl"],
                          "total_bits": bits, "predicted": m["predicted"]})  # fmt: skip
    say(1.0, f"refined: {r.kl:.4g} from {r.start} ({start['kl']:.4g}), {len(r.moves)} moves measured")
    return allocate_table(table, budget_bits=budget_bits, budget_mb=budget_mb)
