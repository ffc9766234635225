"""A mixed W4A8 / W8A8 plan chosen by the transformed-candidate scan, measured on a real model (issue 16).

    python benchmarks/bench_transformed_scan.py [--model default] [--budget 6] [--tokens 4096] [--out ts.json]

1. scan every decoder-block linear x {int4_g128@int8_tok_sym (W4A8), int8_ch_sym@int8_tok_sym (W8A8)} by
   measured KL (workbench.measure.sensitivity_transformed), once without transforms and once with the Hadamard
   rotation (residual + online before down_proj), on `--scan-seqs` x 256 tokens of `wiki`;
2. allocate at `--budget` average weight bits on each, keep the transform set with the lower predicted KL
   (the global choice), and write its plan;
3. evaluate on WikiText-2 (`--tokens`): the chosen mixed plan, the other set's plan, and the uniform W4A8 and
   W8A8 plans on the chosen set; lm_head stays bf16 with an unquantized input throughout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from workbench.measure.evaluate import evaluate
from workbench.measure.sensitivity_transformed import allocate_candidates, scan_transformed
from workbench.model.loading import load_model
from workbench.plan.plan import Plan, Rule
from workbench.plan.transforms import Hadamard

ROT = [Hadamard("residual", 0), Hadamard("down", 0)]
CANDS = ["int4_g128@int8_tok_sym", "int8_ch_sym@int8_tok_sym"]
HEAD = Rule("lm_head", "bf16", "none")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--budget", type=float, default=6.0)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--scan-seqs", type=int, default=1)
    p.add_argument("--scan-len", type=int, default=256, help="scan window length")
    p.add_argument("--sets", default="none,hadamard", help="transform sets to scan: none, hadamard")
    p.add_argument("--out", default="transformed_scan.json")
    a = p.parse_args()
    loaded = load_model(a.model, progress=False)
    res: dict = {"meta": vars(a)}
    t0 = time.perf_counter()
    sets = {"none": [], "hadamard": ROT}
    scans = {
        name: scan_transformed(
            loaded, CANDS, sets[name], n_seqs=a.scan_seqs, seq_len=a.scan_len, progress=False
        )
        for name in a.sets.split(",")
    }
    res["scan_s"] = time.perf_counter() - t0
    allocs = {k: allocate_candidates(s, a.budget, extra_rules=[HEAD]) for k, s in scans.items()}
    chosen = min(allocs, key=lambda k: allocs[k].predicted_kl)
    res["scan_totals"] = {
        k: {c: sum(s.table.cost[x.name][c] for x in s.table.layers) for c in CANDS} for k, s in scans.items()
    }
    res["chosen"] = chosen
    plans = {f"mixed {k}": al.plan for k, al in allocs.items()}
    ts = allocs[chosen].transforms
    plans[f"uniform W4A8 {chosen}"] = Plan(
        default="int4_g128", act="int8_tok_sym", rules=[HEAD], transforms=ts
    )
    plans[f"uniform W8A8 {chosen}"] = Plan(
        default="int8_ch_sym", act="int8_tok_sym", rules=[HEAD], transforms=ts
    )
    for k, al in allocs.items():
        n = {c: sum(1 for v in al.choice.values() if v == c) for c in set(al.choice.values())}
        res[f"mixed {k}"] = {"predicted_kl": al.predicted_kl, "avg_bits": al.avg_bits, "choice_counts": n}
    Path(a.out).with_suffix(".plan.json").write_text(json.dumps(allocs[chosen].plan.to_json(), indent=1))
    for name, plan in plans.items():
        t1 = time.perf_counter()
        r = evaluate(
            loaded, plan.resolve(loaded.model), text="wikitext2", max_tokens=a.tokens, progress=False
        )
        res.setdefault(name, {}).update(r.to_json(), wall_s=time.perf_counter() - t1)
        print(name, f"ppl {r.ppl:.3f} kl {r.kl:.4f} top1 {r.top1:.4f}", res[name].get("predicted_kl", ""))
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "meta"}, indent=1))


if __name__ == "__main__":
    main()
