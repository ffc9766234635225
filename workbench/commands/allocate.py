"""`workbench allocate`: the budget-optimal plan (exact knapsack) from a sensitivity table, and exports."""

from __future__ import annotations

import json
from pathlib import Path

from workbench.commands.common import check_positive, check_text_source, emit_json, table
from workbench.errors import WorkbenchError


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
    p.add_argument(
        "--verify",
        action="store_true",
        help="measure the plan and the uniform plans next to it in size (quick evaluation, cached)",
    )
    p.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="N",
        help="at a budget the table's check did not measure: measure the allocation and up to N moves from "
        "the best measured plan that fits on the scan windows, keep the best (the table is updated)",
    )
    p.add_argument("--model", default=None, help="--verify/--refine: the model (default: the table's source)")
    p.add_argument("--verify-text", default=None, help="--verify: evaluation text (default: the app's)")
    p.add_argument("--verify-tokens", type=int, default=None, help="--verify: tokens (default: the app's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    return p


def _pins(items: list[str]) -> dict[str, str]:
    pins = {}
    for item in items:
        match, sep, spec = item.rpartition("=")
        if not sep or not match or not spec:
            raise WorkbenchError(f"--pin '{item}' must be MATCH=SPEC, e.g. lm_head=bf16 or role:down=int8_ch")
        pins[match] = spec
    return pins


def run(args) -> int:
    from workbench.measure.sensitivity import SensitivityTable
    from workbench.plan.allocate import allocate_table, pareto_front
    from workbench.plan.plan import plan_totals

    tab = SensitivityTable.load(args.sensitivity)
    pins = _pins(args.pin)
    check_positive(args, "budget_bits", "budget_mb", "verify_tokens")
    if args.refine < 0:
        raise WorkbenchError(f"--refine {args.refine}: give a number of moves >= 0 (0: no refinement)")
    check_text_source(args.verify_text, "--verify-text")  # before --verify / --refine load the model
    if args.refine:
        res = _refine(args, tab, pins)
    else:
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
        "measured_calibration_kl": res.measured,
        "guard": res.note or None,
        "measured": res.evidence or None,
    }
    if args.front:
        front = pareto_front(tab, pinned=pins, include_bf16=not args.no_bf16)
        Path(args.front).write_text(json.dumps({"method": tab.method, "points": [p.__dict__ for p in front]}))
        out["front"] = str(args.front)
    if args.llama_cpp:
        from workbench.export.llama_cpp import llama_cpp_export

        ex = llama_cpp_export(res.resolved, tab.layers)
        ex.save(args.llama_cpp)
        out["llama_cpp"] = str(args.llama_cpp)
        out["llama_cpp_notes"] = ex.notes
    verification = _verify(args, tab, res.resolved) if args.verify else None
    if verification is not None:
        out["verify"] = verification.to_json()
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
    if res.evidence:
        print(f"measured: {res.evidence}")
    elif res.measured is not None:
        print(f"measured KL on the calibration windows: {res.measured:.4g}")
    else:
        print("measured: not this plan (the table's pool holds no measurement of it; --verify measures it)")
    if res.note:
        print(f"guard: {res.note}")
    for key in ("front", "llama_cpp"):
        if key in out:
            print(f"{key.replace('_', '.')}: {out[key]}")
    for note in out.get("llama_cpp_notes", []):
        print(f"note: {note}")
    if verification is not None:
        print_verification(verification)
    return 0


def _refine(args, tab, pins):
    """`calibrate.refine_allocation` with the table's model; the table is saved with the new measurements."""
    import sys

    from workbench.measure.calibrate import refine_allocation

    if pins or args.no_bf16:
        raise WorkbenchError("--refine works on the allocator's own options: drop --pin / --no-bf16")
    loaded = _model(args, tab, "--refine")

    def say(fraction: float, text: str) -> None:
        print(f"refine {100 * fraction:.0f}%: {text}", file=sys.stderr)

    res = refine_allocation(loaded, tab, args.budget_bits, args.budget_mb, args.refine, progress=say)
    tab.save(args.sensitivity)
    return res


def _model(args, tab, flag: str):
    """The model the table was scanned on (--model, else the table's source), checked by fingerprint."""
    from workbench.model.loading import load_model

    source = args.model or tab.model.get("source")
    if not source:
        raise WorkbenchError(f"{args.sensitivity} does not name its model: give --model with {flag}")
    loaded = load_model(source, progress=False)
    if loaded.description.fingerprint != tab.model.get("fingerprint", loaded.description.fingerprint):
        raise WorkbenchError(f"--model {source} is not the model {args.sensitivity} was scanned on")
    return loaded


def _verify(args, tab, resolved):
    """Load the model and run `workbench.measure.verify.verify_plan` with the app's quick evaluation
    settings."""
    import sys

    from workbench.defaults import eval_settings
    from workbench.measure.verify import verify_plan

    loaded = _model(args, tab, "--verify")
    ev = eval_settings(loaded.description)
    ev.update({k: v for k, v in (("text", args.verify_text), ("max_tokens", args.verify_tokens)) if v})

    def step(i, n, label):
        print(f"verify {i + 1}/{n}: measuring {label} on {ev['max_tokens']} tokens", file=sys.stderr)

    return verify_plan(loaded, tab, resolved, on_step=step, **ev)


def print_verification(v) -> None:
    """Predicted vs measured, one row per plan, and the verdict."""
    rows = [
        [
            r.label,
            f"{r.avg_bits:.3f}",
            f"{r.mb:.3f}",
            f"{r.predicted:.4g}",
            f"{r.kl:.4g}",
            f"{r.ppl:.3f}",
            f"{100 * r.top1:.1f}%",
            "yes" if r.kind == "plan" or r.fits else "no",
        ]
        for r in v.rows
    ]
    head = ["plan", "avg bits", "MB", f"predicted ({v.method})", "measured KL", "PPL", "top-1", "fits"]
    print(f"\nverification on {v.n_tokens} tokens of '{v.text}' (reference PPL {v.ref_ppl:.3f}):")
    print(table(rows, head))
    print(v.verdict())
