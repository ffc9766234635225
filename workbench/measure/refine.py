"""Measured refinement: the prediction proposes moves, the measurement on the scan windows disposes.

The calibrated table prices mixed plans 1.5-2.4x too low on `default` (the knapsack picks exactly the
layers whose cost is under-estimated), so the exact allocation at the size of a uniform plan can measure
worse than that plan. Refinement starts instead from the best *measured* plan that fits the budget (often
a uniform one) and takes small steps that the table ranks best:

- a move upgrades the `n_up` layers with the highest predicted gain per bit (each to its best-ratio wider
  option) and pays for them by downgrading the layers with the lowest predicted loss per bit saved (each to
  its best-ratio narrower option), until the plan fits again; it is proposed only if its predicted gain is
  positive. Small moves stay close to a measured plan, where the per-layer costs are far more additive than
  in a whole knapsack mixture;
- a "near" move is the same with each layer moved by one step in size only (e.g. nf4_g64 -> int4_g32 up,
  nf4_g64 -> int3_g32 down): a smaller perturbation per layer;
- each move is measured (one forward pass on the scan windows, `replay.BlockRunner`); it is kept only if it
  measures at least ACCEPT_MARGIN below the incumbent, then the next move starts from it with the same
  step; a rejected move is followed by the near move of the same step, then by both at half the step (a
  backtracking line search along the table's ranking);
- at most `max_evals` measurements per budget, and none where the incumbent already beats every uniform
  plan that fits by WIN_MARGIN (nothing to prove there).

Every measured move (kept or not) is returned, so the caller can add it to the table's pool of measured
plans (`calibration["plans"]`), which the allocator's guard draws from. Measured feedback on whole
configurations in the search is the idea of HAQ (Wang et al. 2019, https://arxiv.org/abs/1811.08886); the
line search along a predicted ranking is plain backtracking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACCEPT_MARGIN = 0.01  # a move must measure this fraction below the incumbent (scan-window noise)
WIN_MARGIN = 0.05  # no refinement where the incumbent beats every fitting uniform plan by this much
MAX_EVALS = 4  # measurements per budget
FIRST_STEP = 1 / 16  # the first move upgrades this fraction of the layers (at least one)


@dataclass
class Prices:
    """Per layer and option: storage bits and predicted cost (the table's, bf16 at 0). Layers in order."""

    names: list[str]
    options: list[str]
    bits: dict[str, dict[str, int]]
    cost: dict[str, dict[str, float]]

    @classmethod
    def of(cls, table, include_bf16: bool = True) -> Prices:
        from workbench.plan.allocate import candidate_options, layer_cost
        from workbench.quant.spec import QuantSpec

        options = candidate_options(table, include_bf16)
        parsed = {s: QuantSpec.parse(s) for s in options}
        bits = {x.name: {s: parsed[s].storage_bits(x.out_features, x.in_features) for s in options}
                for x in table.layers}  # fmt: skip
        cost = {x.name: {s: layer_cost(table, x.name, s) for s in options} for x in table.layers}
        return cls([x.name for x in table.layers], options, bits, cost)

    def total_bits(self, specs: list[str]) -> int:
        return sum(self.bits[n][s] for n, s in zip(self.names, specs))

    def predicted(self, specs: list[str]) -> float:
        return sum(self.cost[n][s] for n, s in zip(self.names, specs))


def _best_option(p: Prices, name: str, spec: str, wider: bool, near: bool) -> tuple[float, str] | None:
    """(gain or loss per bit, option) of the best-ratio wider (upgrade) or narrower (downgrade) option;
    `near`: only the options nearest in size to `spec` in that direction (the smallest step)."""
    b0, c0 = p.bits[name][spec], p.cost[name][spec]
    steps = []
    for s in p.options:
        db, dc = p.bits[name][s] - b0, p.cost[name][s] - c0
        if wider and db > 0 and dc < 0:
            steps.append((db, -dc / db, s))  # predicted gain per bit spent: higher is better
        elif not wider and db < 0:
            steps.append((-db, -dc / -db, s))  # minus the predicted loss per bit saved: higher is better
    if near and steps:
        first = min(d for d, _, _ in steps)
        steps = [t for t in steps if t[0] == first]
    best = max(steps, key=lambda t: t[1], default=None)
    return None if best is None else (best[1] if wider else -best[1], best[2])


def propose(
    p: Prices, specs: list[str], capacity: int, n_up: int, near: bool = False
) -> tuple[list[str], float] | None:
    """One move from `specs` (spec per layer of `p.names`): upgrade the `n_up` best layers, downgrade the
    cheapest until the plan fits in `capacity` bits (`near`: each layer by one step in size only). Returns
    (new specs, predicted gain) or None when no move with a positive predicted gain fits."""
    ups = []
    for name, s in zip(p.names, specs):
        opt = _best_option(p, name, s, wider=True, near=near)
        if opt is not None:
            ups.append((opt[0], name, opt[1]))
    ups.sort(key=lambda t: -t[0])
    new = dict(zip(p.names, specs))
    for _, name, s in ups[:n_up]:
        new[name] = s
    touched = {name for _, name, _ in ups[:n_up]}
    downs = []
    for name, s in zip(p.names, specs):
        if name not in touched:
            opt = _best_option(p, name, s, wider=False, near=near)
            if opt is not None:
                downs.append((opt[0], name, opt[1]))
    downs.sort(key=lambda t: t[0])
    over = p.total_bits([new[n] for n in p.names]) - capacity
    for _, name, s in downs:
        if over <= 0:
            break
        over -= p.bits[name][new[name]] - p.bits[name][s]
        new[name] = s
    out = [new[n] for n in p.names]
    gain = p.predicted(specs) - p.predicted(out)
    if over > 0 or gain <= 0 or out == list(specs):
        return None
    return out, gain


@dataclass
class Refinement:
    """What `refine` did at one budget: the plan it ends with and every move it measured."""

    start: str  # label of the measured plan it started from
    specs: list[str]
    kl: float
    moves: list[dict] = field(default_factory=list)  # {"specs", "kl", "predicted", "n_up", "near", "kept"}


def refine(
    p: Prices,
    start: dict,
    capacity: int,
    measure_kl,
    max_evals: int = MAX_EVALS,
    on_move=None,
) -> Refinement:
    """Backtracking line search of the module doc from the measured plan `start` ({"label", "specs", "kl"})
    under `capacity` bits. `measure_kl(specs) -> KL` measures one plan; `on_move(i, n_up)` is called before
    each measurement (progress; it may raise to cancel)."""
    cur, kl = list(start["specs"]), float(start["kl"])
    out = Refinement(start["label"], cur, kl)
    n_up, near = max(1, round(len(p.names) * FIRST_STEP)), False
    while len(out.moves) < max_evals and n_up >= 1:
        move = propose(p, cur, capacity, n_up, near)
        kept = False
        if move is not None:
            if on_move is not None:
                on_move(len(out.moves), n_up)
            specs = move[0]
            m = measure_kl(specs)
            kept = m < kl * (1 - ACCEPT_MARGIN)
            pred = p.predicted(specs)
            out.moves.append({"specs": specs, "kl": m, "predicted": pred, "n_up": n_up, "near": near,
                              "kept": kept})  # fmt: skip
            if kept:
                cur, kl = specs, m
        if not kept:  # try the other kind of move, then halve the step
            n_up, near = (n_up, True) if not near else (n_up // 2, False)
    out.specs, out.kl = cur, kl
    return out


def needs_refinement(plans: list[dict], capacity: int) -> dict | None:
    """The incumbent to refine from at `capacity` (the best measured plan that fits), or None when it beats
    every fitting uniform plan by WIN_MARGIN already (or nothing fits)."""
    fit = [q for q in plans if q["total_bits"] <= capacity]
    if not fit:
        return None
    best = min(fit, key=lambda q: q["kl"])
    uniform = [q["kl"] for q in fit if q["label"].startswith("uniform ")]
    if uniform and best["kl"] < min(uniform) * (1 - WIN_MARGIN):
        return None
    return best


def refine_pool(table, plans: list[dict], caps: list[tuple[str, int]], measure_kl, on_step=None,
                max_evals: int = MAX_EVALS) -> list[dict]:  # fmt: skip
    """`refine` at each budget (label, total bits) of `caps` that `needs_refinement`, smallest first, so a
    plan refined at one budget can start the next. Every measured move joins `plans` (the table's pool:
    {"label", "specs", "kl", "total_bits", "predicted"}); returns one record per budget refined.
    `on_step(i, label, move, n_up)` is called before each measurement."""
    p = Prices.of(table)
    seen = {tuple(q["specs"]) for q in plans}
    known = {tuple(q["specs"]): q["kl"] for q in plans}

    def measure(specs: list[str]) -> float:
        if tuple(specs) not in known:
            known[tuple(specs)] = measure_kl(specs)
        return known[tuple(specs)]

    out, done = [], set()
    for i, (label, bits) in enumerate(caps):
        start = None if bits in done else needs_refinement(plans, bits)
        done.add(bits)
        if start is None:
            continue

        def move(j: int, n_up: int, i=i, label=label) -> None:
            if on_step is not None:
                on_step(i, label, j, n_up)

        r = refine(p, start, bits, measure, max_evals, on_move=move)
        for j, m in enumerate(r.moves):
            if tuple(m["specs"]) not in seen:
                seen.add(tuple(m["specs"]))
                bits_j = p.total_bits(m["specs"])
                plans.append({"label": f"refined {label} #{j + 1}", "specs": m["specs"], "kl": m["kl"],
                              "total_bits": bits_j, "predicted": m["predicted"]})  # fmt: skip
        keys = ("kl", "predicted", "n_up", "near", "kept")
        steps = [{k: m[k] for k in keys} | {"total_bits": p.total_bits(m["specs"])} for m in r.moves]
        out.append({"label": label, "total_bits": bits, "start": r.start, "start_kl": start["kl"],
                    "kl": r.kl, "evals": len(r.moves), "kept": sum(m["kept"] for m in r.moves),
                    "moves": steps})  # fmt: skip
    return out
