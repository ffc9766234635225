"""Why the default allocation loses to uniform nf4_g64 at its size (issue 11): drop candidate specs and
measure the allocations at that size on the calibration windows (the windows the table's uniform plans
were measured on, so the comparison with the calibrated uniform KL is exact).

    python benchmarks/plan_trust_ablation.py        # after benchmarks/plan_trust.py (reads its table)
"""

from __future__ import annotations

import copy
import glob
import sys
import time


def main() -> int:
    from workbench.measure.replay import BlockRunner
    from workbench.measure.sensitivity import SensitivityTable
    from workbench.measure.simulate import quantized_weight
    from workbench.model.data import calibration_batches
    from workbench.model.loading import load_model
    from workbench.paths import cache_dir
    from workbench.plan.allocate import allocate_table
    from workbench.plan.plan import Plan, plan_totals

    loaded = load_model("default", progress=False)
    path = sorted(glob.glob(str(cache_dir("plan_trust", loaded.description.fingerprint) / "table_fisher_*")))
    table = SensitivityTable.load(path[0])
    s = table.settings
    windows = calibration_batches(
        loaded.tokenizer,
        s["text"],
        s["n_seqs"],
        s["seq_len"],
        s["seed"],
        max_context=loaded.description.max_context,
    )
    runner = BlockRunner(loaded.model)
    runner.capture(windows)
    mb = plan_totals(Plan(default="nf4_g64").resolve(table.layers), table.layers).mb
    print(f"uniform nf4_g64 on the calibration windows: KL {table.calibration['nf4_g64']['measured']:.4f}")
    for drop in [(), ("int3_g64",), ("int4_g128",), ("int3_g64", "int4_g128")]:
        t = copy.deepcopy(table)
        t.specs = [x for x in table.specs if x not in drop]
        a = allocate_table(t, budget_mb=mb)
        t0 = time.perf_counter()
        kl = runner.kl_from(0, {n: quantized_weight(loaded.model, n, q) for n, q in a.resolved.items()})
        mix = {k: f"{v / sum(plan_totals(a.resolved, t.layers).by_spec.values()):.1%}"
               for k, v in plan_totals(a.resolved, t.layers).by_spec.items()}  # fmt: skip
        print(
            f"without {', '.join(drop) or '-'}: predicted {a.predicted_cost:.4f}, measured {kl:.4f} "
            f"({time.perf_counter() - t0:.0f} s); mix {mix}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
