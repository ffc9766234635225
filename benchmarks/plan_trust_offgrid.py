"""Plans you can trust (issue 11), budgets the check did not measure: the app's allocate (`allocate_table`,
no model call: the scan's pool and the guard) at budgets off the checked grid, each measured on the
evaluation tokens beside the best uniform plan that fits (uniform KLs from `plan_trust.py --json-out`).

    python benchmarks/plan_trust.py --json-out benchmarks/plan_trust.json     # first: the table, uniform KLs
    python benchmarks/plan_trust_offgrid.py --budgets 3.75,4.25,4.4,4.75,5.5,7.0 --out offgrid.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--budgets", default="3.75,4.25,4.4,4.75,5.5,7.0", help="average bits per weight")
    ap.add_argument("--rows", default=str(Path(__file__).with_name("plan_trust.json")))
    ap.add_argument("--out", help="JSON of the rows")
    args = ap.parse_args(argv)

    from workbench.defaults import DEFAULT_METHOD, default_scan, eval_settings, scan_settings
    from workbench.measure.verify import measure
    from workbench.model.loading import load_model
    from workbench.paths import cache_dir
    from workbench.plan.allocate import allocate_table

    loaded = load_model(args.model, progress=False)
    settings = json.dumps(scan_settings(loaded.description), sort_keys=True)
    tag = hashlib.sha1(f"{DEFAULT_METHOD}|{settings}|calibrate-check".encode()).hexdigest()[:10]
    work = cache_dir("plan_trust", loaded.description.fingerprint)
    table = default_scan(loaded, out=work / f"table_{DEFAULT_METHOD}_{tag}.json")  # plan_trust.py's table
    ev = eval_settings(loaded.description)
    rows = json.loads(Path(args.rows).read_text())["rows"]
    uni = {k: r for k, r in rows.items() if r["group"] == "uniform"}
    out = []
    print("| budget | avg bits | measured KL | best uniform that fits (KL) | margin | guard |")
    print("|---|---|---|---|---|---|")
    for b in [float(x) for x in args.budgets.split(",")]:
        a = allocate_table(table, budget_bits=b)
        r, _ = measure(loaded, a.resolved, ev["text"], ev["seq_len"], ev["max_tokens"])
        fit = [(k, u["kl"]) for k, u in uni.items() if u["total_bits"] <= a.budget_bits]
        best = min(fit, key=lambda kv: kv[1])
        guard = a.note.rsplit("returning ", 1)[-1] if a.note else "-"
        out.append({"budget": b, "avg_bits": a.avg_bits, "kl": r["kl"], "ppl": r["ppl"],
                    "best_uniform": best[0], "best_uniform_kl": best[1], "guard": a.note,
                    "evidence": a.evidence})  # fmt: skip
        print(f"| {b} | {a.avg_bits:.3f} | {r['kl']:.4g} | {best[0]} ({best[1]:.4g}) | "
              f"{100 * (r['kl'] / best[1] - 1):+.1f}% | {guard} |", flush=True)  # fmt: skip
        print(f"[{time.strftime('%H:%M:%S')}] {b} done", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
