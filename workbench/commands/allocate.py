"""`workbench allocate`: the budget-optimal plan (exact knapsack) from a sensitivity table, and exports."""

from __future__ import annotations

import json
from pathlib import Path

from workbench.commands.common import emit_json, table


def add_parser(sub):
    p = sub.add_parser("allocate", help="choose one spec per layer under a size budget (exact knapsack)")
    p.add_argument("--sensitivity", required=True, help="sensitivity table from `workbench sensitivity`")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget-bits", type=float, help="average bits per weight over all quantizable linears")
    g.add_argument("--budget-mb", type=float, help="total linear-layer storage in MB (10^6 bytes)")
    p.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="MATCH=SPEC",
        help="fix layers before allocation (exact name, re:<regex> or role:<role>); repeatable",
    )
    p.add_argument("--no-bf16", action="store_true", help="do not offer bf16 (keep) as a choice")
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--front", help="also write the Pareto front (size vs predicted cost) as JSON")
    p.add_argument("--llama-cpp", help="also write a llama-quantize --tensor-type-file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    return p


def _pins(items: list[str]) -> dict[str, str]:
    from workbench.errors import WorkbenchError

    pins = {}
    for item in items:
        match, sep, spec = item.rpartition("=")
        if not sep or not match or not spec:
            raise WorkbenchError(f"--pin '{item}' must be MATCH=SPEC, e.g. lm_head=bf16 or role:down=int8_ch")
        pins[match] = spec
    return pins


def run(args) -> int:
    from workbench.allocate import allocate_table, pareto_front
    from workbench.plan import plan_totals
    from workbench.sensitivity import SensitivityTable

    tab = SensitivityTable.load(args.sensitivity)
    pins = _pins(args.pin)
    res = allocate_table(
        tab,
        budget_bits=args.budget_bits,
        budget_mb=args.budget_mb,
        pinned=pins,
        include_bf16=not args.no_bf16,
    )
    res.plan.save(args.out)
    totals = plan_totals(res.resolved, tab.layers)
    out = {
        "plan": str(args.out),
        "predicted_cost": res.predicted_cost,
        "method": tab.method,
        "totals": totals.to_json(),
        "budget_bits_total": res.budget_bits,
    }
    if args.front:
        front = pareto_front(tab, pinned=pins, include_bf16=not args.no_bf16)
        Path(args.front).write_text(json.dumps({"method": tab.method, "points": [p.__dict__ for p in front]}))
        out["front"] = str(args.front)
    if args.llama_cpp:
        from workbench.export import llama_cpp_export

        ex = llama_cpp_export(res.resolved, tab.layers)
        ex.save(args.llama_cpp)
        out["llama_cpp"] = str(args.llama_cpp)
        out["llama_cpp_notes"] = ex.notes
    if args.json:
        emit_json(out)
        return 0
    rows = [
        [s, f"{100 * n / totals.n_weights:.1f}%"]
        for s, n in sorted(totals.by_spec.items(), key=lambda kv: -kv[1])
    ]
    print(table(rows, ["spec", "share of weights"]))
    print(f"plan: {totals.summary()}")
    print(f"predicted cost ({tab.method}): {res.predicted_cost:.6g}; written to {args.out}")
    for key in ("front", "llama_cpp"):
        if key in out:
            print(f"{key.replace('_', '.')}: {out[key]}")
    for note in out.get("llama_cpp_notes", []):
        print(f"note: {note}")
    return 0
