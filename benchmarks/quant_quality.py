"""Per-layer quality of GPTQ and AWQ against RTN, and the CPU time of GPTQ over a whole model.

For every quantizable linear of the model (default: SmolLM2-135M-Instruct, 211 linears) and every spec
(default int3_g128 and int4_g128) this measures the relative layer output error
tr(D G D^T) / tr(W G W^T) of RTN, GPTQ and AWQ, with Gram matrices G = X^T X of the layer inputs:
    calibration  32 x 512 tokens of calibration/c4.txt (what GPTQ / AWQ are fitted on)
    held out     8 x 512 tokens of calibration/wiki.txt (other text, never seen by the fit)
and prints, per spec, the fraction of layers where GPTQ <= RTN and AWQ <= RTN and the median ratios (on
both Gram matrices), plus the wall time of GPTQ over all linears. Not a test: numbers are printed.

    python benchmarks/quant_quality.py [--model default] [--specs int3_g128,int4_g128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

import workbench as wb
from workbench.model.inventory import get_linear_weight, get_module, layer_inventory
from workbench.quant.api import fake_quant, quantize_weight
from workbench.quant.metrics import output_error
from workbench.stats.activations import collect_activation_stats


def grams(model, tokenizer, source: str, n_seqs: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """{layer name: X^T X float32 [K, K]} over `n_seqs` x `seq_len` tokens of `source`."""
    batches = wb.calibration_batches(tokenizer, source, n_seqs, seq_len, seed=seed)
    stats = collect_activation_stats(model, batches, gram=True, progress=False)
    out = {}
    for name, st in stats.items():
        leader = stats[st.shared_with] if st.shared_with else st
        out[name] = leader.gram.float()
    return out


def _summary(ratios: list[float]) -> dict:
    return {
        "frac_le_1": sum(r <= 1.0 for r in ratios) / len(ratios),
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
    }


def run(
    model_source: str,
    specs: list[str],
    calib: str,
    held_out: str,
    n_seqs: int,
    seq_len: int,
    awq: bool = True,
) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = wb.load_model(model_source, progress=False)
    model = loaded.model
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    G_cal = grams(model, loaded.tokenizer, calib, n_seqs, seq_len, seed=0)
    t_cal = time.perf_counter() - t0
    G_held = grams(model, loaded.tokenizer, held_out, max(1, n_seqs // 4), seq_len, seed=1)
    inv = layer_inventory(model)
    result = {
        "model": loaded.description.name,
        "n_linears": len(inv),
        "threads": torch.get_num_threads(),
        "calibration": f"{n_seqs} x {seq_len} tokens of {calib}",
        "held_out": f"{max(1, n_seqs // 4)} x {seq_len} tokens of {held_out}",
        "load_s": t_load,
        "gram_collection_s": t_cal,
        "specs": {},
    }
    for spec in specs:
        rows = []
        t_gptq = t_awq = cpu_gptq = 0.0
        for layer in inv:
            W = get_linear_weight(get_module(model, layer.name)).detach().float()
            Gc, Gh = G_cal[layer.name], G_held[layer.name]
            W_rtn = fake_quant(W, spec)
            t, c = time.perf_counter(), time.process_time()
            W_gptq = quantize_weight(W, spec + ":gptq", Gc, layer=layer.name).dequantize()
            t_gptq += time.perf_counter() - t
            cpu_gptq += time.process_time() - c
            row = {"layer": layer.name, "role": layer.role, "shape": [layer.out_features, layer.in_features]}
            for tag, G in (("cal", Gc), ("held", Gh)):
                rtn = output_error(W, W_rtn, G)
                row[f"rtn_{tag}"] = rtn
                row[f"gptq_ratio_{tag}"] = output_error(W, W_gptq, G) / rtn
            if awq:
                t = time.perf_counter()
                qa = quantize_weight(W, spec + ":awq", Gc, layer=layer.name)
                t_awq += time.perf_counter() - t
                W_awq = qa.dequantize()
                row["awq_alpha"] = qa.info["alpha"]
                for tag, G in (("cal", Gc), ("held", Gh)):
                    row[f"awq_ratio_{tag}"] = output_error(W, W_awq, G) / row[f"rtn_{tag}"]
            rows.append(row)
        summ = {
            "gptq_all_linears_s": t_gptq,
            "gptq_all_linears_cpu_s": cpu_gptq,
            "awq_all_linears_s": t_awq if awq else None,
        }
        for algo in ("gptq", "awq") if awq else ("gptq",):
            for tag in ("cal", "held"):
                summ[f"{algo}_{tag}"] = _summary([r[f"{algo}_ratio_{tag}"] for r in rows])
            by_role = defaultdict(list)
            for r in rows:
                by_role[r["role"]].append(r[f"{algo}_ratio_held"])
            summ[f"{algo}_held_median_by_role"] = {k: statistics.median(v) for k, v in by_role.items()}
        result["specs"][spec] = {"summary": summ, "layers": rows}
    return result


def print_table(res: dict) -> None:
    print(
        f"{res['model']}: {res['n_linears']} linears, {res['threads']} threads; calibration "
        f"{res['calibration']}, held out {res['held_out']}; "
        f"Gram collection {res['gram_collection_s']:.1f} s"
    )
    print(f"{'spec':12s} {'algo':5s} {'Gram':5s} {'frac<=RTN':>9s} {'median':>7s} {'min':>6s} {'max':>6s}")
    for spec, d in res["specs"].items():
        s = d["summary"]
        for algo in ("gptq", "awq"):
            for tag in ("cal", "held"):
                key = f"{algo}_{tag}"
                if key in s:
                    v = s[key]
                    print(
                        f"{spec:12s} {algo:5s} {tag:5s} {v['frac_le_1']:9.3f} {v['median']:7.3f} "
                        f"{v['min']:6.3f} {v['max']:6.3f}"
                    )
        print(
            f"{spec:12s} GPTQ all linears: {s['gptq_all_linears_s']:.1f} s wall "
            f"({s['gptq_all_linears_cpu_s']:.1f} s CPU)"
            + (f"; AWQ all linears: {s['awq_all_linears_s']:.1f} s" if s.get("awq_all_linears_s") else "")
        )
        for algo in ("gptq", "awq"):
            if f"{algo}_held_median_by_role" in s:
                roles = ", ".join(f"{k} {v:.3f}" for k, v in s[f"{algo}_held_median_by_role"].items())
                print(f"{spec:12s} {algo} median held-out ratio by role: {roles}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--specs", default="int3_g128,int4_g128")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--held-out", default="wiki")
    ap.add_argument("--n-seqs", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--no-awq", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 avoids OpenMP spin-waits when the CPU is shared)",
    )
    ap.add_argument("--json", help="write all per-layer numbers to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(
        args.model,
        args.specs.split(","),
        args.calib,
        args.held_out,
        args.n_seqs,
        args.seq_len,
        awq=not args.no_awq,
    )
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
