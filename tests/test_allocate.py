"""Allocation: the exact knapsack against brute force, the Pareto front, budgets, pins and refusals."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from workbench.errors import WorkbenchError
from workbench.measure.sensitivity import SensitivityTable
from workbench.model.inventory import layer_inventory
from workbench.plan.allocate import allocate_table, pareto_front, pareto_merge, solve_mckp
from workbench.plan.plan import plan_totals
from workbench.quant.spec import QuantSpec


def _instance(seed: int, n_items: int, n_opts: int):
    rng = np.random.default_rng(seed)
    weights = [rng.integers(1, 40, size=n_opts) * 32 for _ in range(n_items)]  # bits, gcd 32 like real specs
    costs = [rng.random(n_opts) for _ in range(n_items)]
    return costs, weights


def _brute(costs, weights, cap):
    best, arg = np.inf, None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        w = sum(weights[i][j] for i, j in enumerate(combo))
        if w <= cap:
            c = sum(costs[i][j] for i, j in enumerate(combo))
            if c < best - 1e-12:
                best, arg = c, combo
    return best, arg


@pytest.mark.parametrize("method", ["dp", "ilp"])
@pytest.mark.parametrize("seed", range(12))
def test_knapsack_matches_brute_force(seed, method):
    costs, weights = _instance(seed, n_items=5 + seed % 3, n_opts=3 + seed % 3)
    lo = sum(int(w.min()) for w in weights)
    hi = sum(int(w.max()) for w in weights)
    rng = np.random.default_rng(100 + seed)
    for cap in [lo - 1, lo, int(rng.integers(lo, hi)), int(rng.integers(lo, hi)), hi]:
        best, _ = _brute(costs, weights, cap)
        picks = solve_mckp(costs, weights, cap, method=method)
        if not np.isfinite(best):
            assert picks is None
            continue
        assert sum(weights[i][j] for i, j in enumerate(picks)) <= cap
        assert sum(costs[i][j] for i, j in enumerate(picks)) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_pareto_front_matches_brute_force(seed):
    costs, weights = _instance(seed, n_items=5, n_opts=3 + seed % 2)
    pts = {}
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        w = sum(int(weights[i][j]) for i, j in enumerate(combo))
        c = sum(costs[i][j] for i, j in enumerate(combo))
        pts[w] = min(pts.get(w, np.inf), c)
    front, best = [], np.inf
    for w in sorted(pts):
        if pts[w] < best:
            front.append((w, pts[w]))
            best = pts[w]
    fw, fc = pareto_merge(costs, weights)
    assert fw.tolist() == [w for w, _ in front]
    assert np.allclose(fc, [c for _, c in front])
    # every front point is the knapsack optimum at its own size
    for w, c in front:
        picks = solve_mckp(costs, weights, w, method="dp")
        assert sum(costs[i][j] for i, j in enumerate(picks)) == pytest.approx(c)


@pytest.fixture(scope="module")
def table(stories):
    layers = layer_inventory(stories.model)
    specs = ["int2_g32", "int3_g32", "int4_g32", "int8_ch"]
    rng = np.random.default_rng(0)
    base = {"int2_g32": 1.0, "int3_g32": 0.3, "int4_g32": 0.07, "int8_ch": 0.001}
    cost = {x.name: {s: base[s] * float(rng.lognormal(0, 1)) for s in specs} for x in layers}
    return SensitivityTable(method="proxy", specs=specs, layers=layers, cost=cost)


def _plan_cost(table, resolved):
    return sum(0.0 if str(s) == "bf16" else table.cost[n][str(s)] for n, s in resolved.items())


def test_allocate_table_budget_pins_and_front(table):
    layers = table.layers
    a = allocate_table(table, budget_bits=3.6)
    t = plan_totals(a.resolved, layers)
    assert t.avg_bits <= 3.6 and t.total_bits == a.total_bits
    assert a.predicted_cost == pytest.approx(_plan_cost(table, a.resolved))
    # the plan JSON reproduces the allocation
    assert a.plan.resolve(layers) == a.resolved
    # the allocation is the front's best point under the budget
    front = pareto_front(table, max_points=None)
    ok = [p for p in front if p.avg_bits <= 3.6 + 1e-12]
    assert a.predicted_cost == pytest.approx(ok[-1].cost)
    assert all(b.cost < p.cost and b.mb > p.mb for p, b in zip(front, front[1:]))
    # a uniform plan of the same size cannot beat it
    uniform = {x.name: QuantSpec.parse("int3_g32") for x in layers}
    ub = plan_totals(uniform, layers)
    same = allocate_table(table, budget_mb=ub.mb)
    assert same.total_bits <= ub.total_bits and same.predicted_cost <= _plan_cost(table, uniform) + 1e-12
    # pins are respected and count against the budget
    free = allocate_table(table, budget_bits=5.5)
    p = allocate_table(table, budget_bits=5.5, pinned={"lm_head": "bf16", "role:k": "int8_ch"})
    assert str(p.resolved["lm_head"]) == "bf16"
    assert all(str(p.resolved[x.name]) == "int8_ch" for x in layers if x.role == "k")
    assert plan_totals(p.resolved, layers).avg_bits <= 5.5 and p.predicted_cost >= free.predicted_cost
    # more budget never costs more
    assert free.predicted_cost <= a.predicted_cost


def test_allocate_refusals(table, tmp_path):
    with pytest.raises(WorkbenchError, match="below the smallest plan possible"):
        allocate_table(table, budget_bits=1.0)
    with pytest.raises(WorkbenchError, match="exactly one budget"):
        allocate_table(table)
    with pytest.raises(WorkbenchError, match="pin 're:nothing' matches no layer"):
        allocate_table(table, budget_bits=4, pinned={"re:nothing": "bf16"})
    partial = SensitivityTable(
        method="kl",
        specs=table.specs,
        layers=table.layers,
        cost={k: v for k, v in list(table.cost.items())[:3]},
    )
    with pytest.raises(WorkbenchError, match="no cost for layer .* \\(incomplete scan"):
        allocate_table(partial, budget_bits=4)
    # table JSON round trip, and refusals of other files
    path = tmp_path / "sens.json"
    table.save(path)
    again = SensitivityTable.load(path)
    assert again.cost == table.cost and again.layers == table.layers and again.complete
    path.write_text('{"format": "workbench.plan", "version": 1}')
    with pytest.raises(WorkbenchError, match="not a workbench sensitivity table"):
        SensitivityTable.load(path)


def test_native_stdout_goes_to_stderr_during_the_ilp(capfd):
    """HiGHS writes stray debug lines to fd 1; inside the solver guard they land on fd 2, and fd 1 is back
    afterwards (so `workbench allocate --json` prints one JSON object)."""
    import os

    from workbench.plan.allocate import _c_stdout_to_stderr

    with _c_stdout_to_stderr():
        os.write(1, b"native noise\n")
    os.write(1, b"after\n")
    out, err = capfd.readouterr()
    assert out == "after\n" and "native noise" in err


def test_allocate_cli_json_is_one_object(table, tmp_path, capfd):
    """stdout, file descriptor 1 included (native writes too), holds one JSON object; run in this process."""
    import json

    from workbench.cli import main

    path = tmp_path / "sens.json"
    table.save(path)
    capfd.readouterr()
    argv = ["allocate", "--sensitivity", str(path)]
    code = main(argv + ["--budget-bits", "4", "--out", str(tmp_path / "plan.json"), "--json"])
    printed, err = capfd.readouterr()
    assert code == 0, err
    out = json.loads(printed)
    assert isinstance(out, dict) and (tmp_path / "plan.json").is_file()
