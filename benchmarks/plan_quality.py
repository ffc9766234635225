"""Plan quality on a real model: uniform formats vs budget-optimal allocations, and sensitivity scan costs.

One command reproduces the issue-3 and issue-5 tables of benchmarks/RESULTS.md:

    python benchmarks/plan_quality.py                      # default model, WikiText-2 test, 32k tokens, CPU
    python benchmarks/plan_quality.py --device cuda        # same numbers on a GPU, much faster

Steps (each result is kept in a state file, so an interrupted run continues where it stopped):
  1. reference perplexity (fp32 model) on `--text` (32,768 tokens in windows of 512 by default);
  2. uniform plans (every linear, lm_head included): fp16 / bf16 weights, int4_g128 / int3_g128 with RTN and
     GPTQ, nvfp4, mxfp4, nf4_g64, fp8_e4m3; GPTQ uses Gram matrices of `--calib` (32 x 512 tokens of the
     `wiki` calibration text);
  3. a Fisher-weighted proxy sensitivity table over the allocation candidates (GPTQ int2/3/4, int8_ch,
     nvfp4, fp8_e4m3, bf16) and exact knapsack allocations at 3.0 / 3.5 / 4.0 average bits and at exactly
     the size of uniform int3_g128 and int4_g128; each allocated plan evaluated like the uniform ones;
  4. wall time of the proxy scans (plain, Fisher-weighted) and of the kl scan over the six issue specs,
     and the Spearman rank correlation between proxy and kl costs. `--kl-layers N` limits the kl scan to
     the first N layers in a spread of blocks (its full time is then extrapolated and labelled so).
Prints markdown tables; `--write-results` also replaces this script's two sections in RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCAN_SPECS = ["int2_g64", "int3_g128", "int4_g128", "int8_ch", "nvfp4", "fp8_e4m3"]
ALLOC_SPECS = ["int2_g64:gptq", "int3_g128:gptq", "int4_g128:gptq", "int8_ch", "nvfp4", "fp8_e4m3"]
UNIFORM = [
    "fp16",
    "bf16",
    "int4_g128",
    "int3_g128",
    "int4_g128:gptq",
    "int3_g128:gptq",
    "nvfp4",
    "mxfp4",
    "nf4_g64",
    "fp8_e4m3",
]


class State:
    """Step results in a JSON file, re-read before every step, so several processes can share one run.

    A process claims a step before computing it; steps claimed by another live process are skipped
    (`get` returns None) and picked up by a later run if that process dies.
    """

    def __init__(self, path: Path, skip: set[str] = frozenset()):
        self.path = path
        self.skip = skip

    def _load(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def _save(self, d: dict) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(d, indent=1))
        tmp.replace(self.path)

    def get(self, key, fn):
        d = self._load()
        if key in d:
            return d[key]["value"]
        if key in self.skip or "*" in self.skip:
            return None
        owner = d.get("_claims", {}).get(key)
        if owner and owner != os.getpid() and _alive(owner):
            print(
                f"[{time.strftime('%H:%M:%S')}] {key}: computed by process {owner}, skipped", file=sys.stderr
            )
            return None
        d.setdefault("_claims", {})[key] = os.getpid()
        self._save(d)
        t0 = time.perf_counter()
        val = fn()
        d = self._load()
        d[key] = {"value": val, "seconds": time.perf_counter() - t0}
        d.get("_claims", {}).pop(key, None)
        self._save(d)
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {json.dumps(val)[:200]}", file=sys.stderr, flush=True)
        return val


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--text", default="wikitext2")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib", default="wiki")
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--scan-seqs", type=int, default=2, help="kl scan / Fisher batch: windows")
    ap.add_argument("--scan-seq-len", type=int, default=256, help="kl scan / Fisher batch: window length")
    ap.add_argument(
        "--alloc-specs", default=",".join(ALLOC_SPECS), help="allocation candidates (bf16 is added)"
    )
    ap.add_argument("--kl-layers", type=int, default=None, help="limit the kl scan to N layers (extrapolate)")
    ap.add_argument(
        "--skip", default="", help="comma list of step groups (uniform,alloc,scans,kl,alloc_kl) or step keys"
    )
    ap.add_argument("--state", default=None, help="state file (default: in the workbench cache)")
    ap.add_argument("--write-results", action="store_true", help="replace this script's RESULTS.md sections")
    ap.add_argument("--note", action="append", default=[], help="extra paragraph for the issue-5 section")
    ap.add_argument("--report-only", action="store_true", help="compute nothing: print what the state holds")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(","))) | ({"*"} if args.report_only else set())
    alloc_specs = [x for x in args.alloc_specs.split(",") if x]

    from workbench.measure.evaluate import evaluate
    from workbench.measure.sensitivity import SensitivityTable, sensitivity_scan
    from workbench.measure.simulate import calibration_grams
    from workbench.model.inventory import layer_inventory
    from workbench.model.loading import load_model
    from workbench.paths import cache_dir
    from workbench.plan.allocate import allocate_table
    from workbench.plan.plan import Plan, plan_totals

    loaded = load_model(args.model, device=args.device)
    layers = layer_inventory(loaded.model)
    dev = args.device.split(":")[0]
    tag = f"{loaded.description.fingerprint}-{dev}-{Path(args.text).name}-{args.tokens}-{args.seq_len}"
    work = cache_dir("plan_quality", tag)
    state = State(Path(args.state) if args.state else work / "state.json", skip)
    ev = dict(text=args.text, seq_len=args.seq_len, max_tokens=args.tokens, progress=True)
    cal = dict(
        text=args.calib,
        n_seqs=args.scan_seqs,
        seq_len=args.scan_seq_len,
        calib_seqs=args.calib_seqs,
        calib_seq_len=args.calib_seq_len,
    )
    grams_cache: dict = {}

    def grams():
        if not grams_cache:
            grams_cache.update(
                calibration_grams(loaded, None, args.calib, args.calib_seqs, args.calib_seq_len)
            )
        return grams_cache

    allocs = {}

    def run_eval(resolved):
        needs = any(s.algo != "rtn" for s in resolved.values())
        r = evaluate(loaded, resolved, grams=grams() if needs else None, **ev)
        t = plan_totals(resolved, layers)
        return {
            "ppl": r.ppl,
            "kl": r.kl,
            "top1": r.top1,
            "avg_bits": t.avg_bits,
            "mb": t.mb,
            "n_tokens": r.n_tokens,
            "ref_ppl": r.ref_ppl,
        }

    def allocate_budgets(label: str, tab) -> None:
        """Exact knapsack on `tab` at the uniform int3/int4 sizes and at 3.0 / 3.5 / 4.0 bits, evaluated."""
        for b in ["int3_g128", "int4_g128", 3.0, 3.5, 4.0]:  # equal sizes first

            def do(b=b):
                if isinstance(b, str):
                    mb = plan_totals(Plan(default=b).resolve(layers), layers).mb
                    a = allocate_table(tab, budget_mb=mb)
                else:
                    a = allocate_table(tab, budget_bits=b)
                a.plan.save(work / f"plan_{label}_{b}.json")
                out = run_eval(a.resolved)
                out["predicted_kl"] = a.predicted_cost
                out["mix"] = plan_totals(a.resolved, layers).by_spec
                return out

            allocs[(label, b)] = state.get(f"alloc:{label}:{b}", do)

    uniform = {}
    order = ["int3_g128", "int4_g128"] + [s for s in UNIFORM if s not in ("int3_g128", "int4_g128")]
    if "uniform" not in skip:
        for s in order[:2]:
            uniform[s] = state.get(f"uniform:{s}", lambda s=s: run_eval(Plan(default=s).resolve(layers)))

    if "alloc" not in skip:
        label = "gptq" if "gptq" in args.alloc_specs else "rtn"
        if alloc_specs not in (ALLOC_SPECS, [s.split(":")[0] for s in ALLOC_SPECS]):
            # another candidate set: its own state keys and files (a short digest of the spec list)
            label += "-" + hashlib.sha1(",".join(alloc_specs).encode()).hexdigest()[:6]
        path = work / f"alloc_fisher_{label}.json"
        info = state.get(
            f"alloc_table:{label}",
            lambda: _scan_info(
                sensitivity_scan(loaded, alloc_specs, "proxy", out=path, importance="fisher", **cal)
            ),
        )
        tab = SensitivityTable.load(path) if info is not None else None
        if tab is not None:
            allocate_budgets(label, tab)
    if "uniform" not in skip:
        for s in order[2:]:
            uniform[s] = state.get(f"uniform:{s}", lambda s=s: run_eval(Plan(default=s).resolve(layers)))

    scans = {}
    if "scans" not in skip:
        scans["proxy"] = state.get(
            "scan:proxy",
            lambda: _scan_info(
                sensitivity_scan(loaded, SCAN_SPECS, "proxy", out=work / "scan_proxy.json", **cal)
            ),
        )
        scans["fisher"] = state.get(
            "scan:fisher",
            lambda: _scan_info(
                sensitivity_scan(
                    loaded, SCAN_SPECS, "proxy", out=work / "scan_fisher.json", importance="fisher", **cal
                )
            ),
        )
    if "kl" not in skip:
        subset = None
        if args.kl_layers:
            step = max(1, len(layers) // args.kl_layers)
            subset = [x.name for x in layers[::step]][: args.kl_layers]
        kname = f"scan:kl:{args.kl_layers or 'all'}"
        kl_path = work / f"scan_kl_{args.kl_layers or 'all'}.json"
        scans["kl"] = state.get(
            kname,
            lambda: _scan_info(
                sensitivity_scan(
                    loaded,
                    SCAN_SPECS,
                    "kl",
                    out=kl_path,
                    layers=subset,
                    **cal,
                )
            ),
        )
        kl = SensitivityTable.load(kl_path) if scans.get("kl") else None
        if kl is not None and scans.get("proxy") and scans.get("fisher"):
            names = [x.name for x in kl.layers]
            for other in ("proxy", "fisher"):
                t = SensitivityTable.load(work / f"scan_{other}.json")
                a = [t.cost[n][s] for n in names for s in SCAN_SPECS]
                b = [kl.cost[n][s] for n in names for s in SCAN_SPECS]
                scans[f"spearman_{other}_kl"] = spearman(a, b)
                per_spec = [
                    spearman([t.cost[n][s] for n in names], [kl.cost[n][s] for n in names])
                    for s in SCAN_SPECS
                ]
                scans[f"spearman_{other}_kl_within_spec"] = dict(zip(SCAN_SPECS, per_spec))
            scans["kl_layers"] = len(names)
        if kl is not None and not args.kl_layers and "alloc_kl" not in skip:
            # the same budgets on the measured table (RTN candidates: each cost is a real single-layer ΔKL)
            allocate_budgets("kl", kl)

    ref = state.get("reference", lambda: evaluate(loaded, None, **ev).to_json())
    if ref is None:  # every evaluation carries the reference perplexity of the same tokens
        done = [r for r in [*uniform.values(), *allocs.values()] if r is not None]
        if not done:
            print("nothing measured yet (reference claimed by another process)", file=sys.stderr)
            return 1
        ref = {"ppl": done[0]["ref_ppl"], "n_tokens": done[0]["n_tokens"]}
    uniform = {k: v for k, v in uniform.items() if v is not None}
    allocs = {k: v for k, v in allocs.items() if v is not None}
    scans = {k: v for k, v in scans.items() if v is not None}
    md = render(loaded, args, ref, uniform, allocs, scans, len(layers))
    print(md)
    if args.write_results:
        write_sections(md)
    return 0


def _scan_info(tab) -> dict:
    return {
        "layers": len(tab.layers),
        "specs": tab.specs,
        "setup_s": tab.timing.get("setup", 0.0),
        "scan_s": tab.timing.get("scan", 0.0),
    }


def _row(name, r, ref_ppl):
    kl = f"{r['kl']:.4f}" if r["kl"] >= 1e-3 else f"{r['kl']:.1e}"
    return (
        f"| {name} | {r['avg_bits']:.3f} | {r['mb']:.2f} | {r['ppl']:.3f} | {r['ppl'] / ref_ppl:.3f} | "
        f"{kl} | {100 * r['top1']:.1f}% |"
    )


def render(loaded, args, ref, uniform, allocs, scans, n_layers) -> str:
    import platform

    import torch

    d = loaded.description
    ref_ppl = ref["ppl"]
    head = (
        "| plan | avg bits | MB | PPL | PPL / ref | KL (nats/token) | top-1 |\n|---|---|---|---|---|---|---|"
    )
    env = (
        f"{d.name} ({d.n_params / 1e6:.0f}M), {args.text}, {ref['n_tokens']} predicted tokens in windows of "
        f"{args.seq_len}; device {args.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads); GPTQ calibration {args.calib_seqs} x {args.calib_seq_len} "
        f"tokens of '{args.calib}'. Sizes: all {n_layers} linear layers incl. lm_head "
        "(embeddings not counted)."
    )
    out = [
        "## End-to-end quality (issue 3)",
        "",
        f"Measured by `python benchmarks/plan_quality.py` ({env})",
        "",
        head,
        f"| fp32 reference | 32 | - | {ref_ppl:.3f} | 1.000 | 0 | 100% |",
    ]
    for s in UNIFORM:
        if s in uniform:
            out.append(
                _row(
                    f"uniform {s}" + ("" if ":" in s else ":rtn" if s.startswith("int") else ""),
                    uniform[s],
                    ref_ppl,
                )
            )
    missing = [s for s in UNIFORM if s not in uniform]
    if missing:
        out.append(f"\nNot measured in this run: {', '.join(missing)}.")
    out += [
        "",
        "## Sensitivity and allocation (issue 5)",
        "",
        f"Same setup. Allocations: exact knapsack over a Fisher-weighted proxy table of "
        f"{args.alloc_specs.replace(',', ', ')}, bf16 (Fisher from {args.scan_seqs} x {args.scan_seq_len} "
        "tokens); "
        "rows labelled (kl): the same knapsack over the measured kl table (RTN candidates "
        + ", ".join(SCAN_SPECS)
        + ", bf16). '= int3_g128' means a budget of exactly that uniform plan's size.",
        "",
        head,
    ]
    for (label, b), r in allocs.items():
        out.append(
            _row(
                f"allocated ({label}) {'= ' + b if isinstance(b, str) else f'{b} bits'} "
                f"(predicted KL {r['predicted_kl']:.4f})",
                r,
                ref_ppl,
            )
        )
    for s in ("int3_g128", "int3_g128:gptq", "int4_g128", "int4_g128:gptq"):
        if s in uniform:
            out.append(_row(f"uniform {s}", uniform[s], ref_ppl))
    if scans:
        out += [
            "",
            f"Sensitivity scans ({n_layers} layers x 6 specs: " + ", ".join(SCAN_SPECS) + "):",
            "",
            "| scan | layers | setup s | scan s |",
            "|---|---|---|---|",
        ]
        for k in ("proxy", "fisher", "kl"):
            if k in scans:
                s = scans[k]
                out.append(f"| {k} | {s['layers']} | {s['setup_s']:.1f} | {s['scan_s']:.1f} |")
        if "kl" in scans and scans["kl"]["layers"] < n_layers:
            full = scans["kl"]["scan_s"] / scans["kl"]["layers"] * n_layers
            out.append(
                f"\nkl scan measured on {scans['kl']['layers']} of {n_layers} layers; full scan "
                f"extrapolated: {full:.0f} s."
            )
        for k in ("proxy", "fisher"):
            if f"spearman_{k}_kl" in scans:
                w = ", ".join(f"{s} {v:.2f}" for s, v in scans[f"spearman_{k}_kl_within_spec"].items())
                out.append(
                    f"\nSpearman({k}, kl) over {scans['kl_layers']} layers x 6 specs: "
                    f"{scans[f'spearman_{k}_kl']:.3f}; within each spec: {w}."
                )
    out += [""] + [f"{n}\n" for n in args.note]
    return "\n".join(out).rstrip("\n") + "\n"


def write_sections(md: str) -> None:
    """Replace (or append) the two sections this script owns in benchmarks/RESULTS.md."""
    path = REPO / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.is_file() else "# Results\n"
    parts = md.split("\n## ")
    sections = {
        ("## " + p if not p.startswith("## ") else p).split("\n", 1)[0]: (
            "## " + p if not p.startswith("## ") else p
        )
        for p in parts
    }
    for title, body in sections.items():
        if title in text:
            start = text.index(title)
            nxt = text.find("\n## ", start + len(title))
            end = len(text) if nxt < 0 else nxt + 1
            text = text[:start] + body.rstrip("\n") + "\n" + ("\n" if nxt >= 0 else "") + text[end:]
        else:
            text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
