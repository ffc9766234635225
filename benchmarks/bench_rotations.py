"""Rotations, smoothing and activation quantization on a real model (issue 16), simulated (CPU or GPU).

    python benchmarks/bench_rotations.py [--model default|PATH.gguf] [--tokens 32768] [--out rotations.json]
        [--device cuda|cpu] [--budget-s S]
    python benchmarks/bench_rotations.py --report --out rotations.json     # the markdown tables of a run

Device: `--device` (default: cuda when available). The model, the evaluation, the simulated activation and
weight quantization and GPTQ run there in float32 with fp32 matmuls ("highest" precision: no TF32), as on the
CPU: the KLs of the 8-bit rows are ~1e-3 nats, the size of the noise bf16 alone adds
(benchmarks/w8a8_bf16_noise.py), so the GPU table must not change the arithmetic, only where it runs. RTN
weights are quantized on the CPU in every case (the same code and numbers as the CPU tables); GPTQ runs on the
GPU when the model is there (`measure.simulate.quantized_weight`). `--budget-s`: no new row starts after that
many seconds (rows already in --out are kept; the rest print "skipped (budget)").

Steps (each result is written to --out as soon as it exists; a rerun skips what is there, so it resumes):
1. equivalence: max |Δlogit| between the fp32 model and each transformed copy on 2 x 128 tokens of wikitext2;
2. outliers: kurtosis and max/median channel of layers.11 down_proj's (and q_proj's) input before and after
   the rotation (16 x 512 tokens of `wiki`);
3. quality: perplexity and KL(P_ref || P_q) on wikitext2 of W16A16, W8A8, W4A16, W4A8 and W4A4 (RTN, GPTQ),
   each without and with the Hadamard rotation (residual + online before down_proj), and W8A8 with SmoothQuant
   α = 0.5 on every linear. lm_head stays bf16 with unquantized input in every configuration (as in QuaRot);
4. fusion: W4A16 RTN with the RMSNorm scales fused into the linears and no rotation (Q = I), to separate the
   effect of the fusion from that of the rotation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from workbench.measure.evaluate import evaluate
from workbench.measure.simulate import calibration_grams
from workbench.model.data import calibration_batches, eval_windows
from workbench.model.loading import load_model
from workbench.plan.plan import Plan, Rule
from workbench.plan.transforms import Hadamard, Smooth
from workbench.stats.outliers import input_outliers
from workbench.transform.apply import apply_transforms
from workbench.transform.rotate import max_logit_change

ROT = (Hadamard("residual", 0), Hadamard("down", 0))
# name -> (weight spec of every linear but lm_head, input spec or None)
# (run in this order: the cheap RTN rows first, GPTQ last, as it needs calibration Grams of both models)
CONFIGS = {
    "W16A16": ("bf16", None),
    "W8A8": ("int8_ch_sym", "int8_tok_sym"),
    "W4A4 RTN": ("int4_g128", "int4_tok_sym"),
    "W4A8 RTN": ("int4_g128", "int8_tok_sym"),
    "W4A16 RTN": ("int4_g128", None),
    "W4A16 GPTQ": ("int4_g128:gptq", None),
    "W4A8 GPTQ": ("int4_g128:gptq", "int8_tok_sym"),
    "W4A4 GPTQ": ("int4_g128:gptq", "int4_tok_sym"),
}


def plan_for(weights: str, act: str | None, transforms) -> Plan:
    head = Rule("lm_head", "bf16", "none" if act else None)
    return Plan(default=weights, act=act, rules=[head], transforms=list(transforms))


def pick_device(name: str | None) -> str:
    """`--device`: the name given, else cuda when available, else cpu."""
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def over_budget(args) -> bool:
    """True once --budget-s seconds have passed since the start (no new row starts then)."""
    return args.budget_s is not None and time.perf_counter() - args.t_start > args.budget_s


def save(out: Path, results: dict) -> None:
    out.write_text(json.dumps(results, indent=1) + "\n")


def equivalence(loaded, results: dict, out: Path, smooth_calib: int) -> None:
    ids = eval_windows(loaded.tokenizer, "wikitext2", 128)[:2]
    cases = {
        "hadamard residual": [ROT[0]],
        "hadamard down": [ROT[1]],
        "hadamard residual+down": list(ROT),
        "smooth all a=0.5": [Smooth("re:.*", 0.5, smooth_calib)],
    }
    for name, ts in cases.items():
        key = f"equivalence {name}"
        if key not in results:
            t0 = time.perf_counter()
            tl = apply_transforms(loaded, ts)
            with torch.no_grad():
                scale = float(loaded.model(input_ids=ids.to(loaded.device)).logits.abs().max())
            results[key] = {
                "max_abs_dlogit": max_logit_change(loaded.model, tl.model, ids),
                "max_abs_logit": scale,
                "seconds": time.perf_counter() - t0,
            }
            save(out, results)
        print(key, results[key], flush=True)


def outliers(loaded, rotated, results: dict, out: Path, block: int) -> None:
    if "outliers" in results:
        print("outliers", results["outliers"])
        return
    batches = calibration_batches(loaded.tokenizer, "wiki", 16, 512, 0, loaded.description.max_context)
    names = [f"model.layers.{block}.mlp.down_proj", f"model.layers.{block}.self_attn.q_proj"]
    before = input_outliers(loaded.model, names, batches)
    after = input_outliers(rotated.model, names, batches)
    results["outliers"] = {n: {"before": before[n].to_json(), "after": after[n].to_json()} for n in names}
    save(out, results)
    print("outliers", results["outliers"], flush=True)


def quality(loaded, rotated, args, results: dict, out: Path) -> None:
    runs = [(name, w, a, rot) for name, (w, a) in CONFIGS.items() for rot in (False, True)]
    runs.insert(4, ("W8A8 SmoothQuant a=0.5", "int8_ch_sym", "int8_tok_sym", "smooth"))
    if args.only:
        only = set(args.only.split(","))
        runs = [r for r in runs if r[0] in only]
    smoothed = None
    for name, w, a, rot in runs:
        key = f"{name}{' +hadamard' if rot is True else ''}"
        if key in results:
            print(key, results[key])
            continue
        if over_budget(args):
            print(key, "skipped (budget)", flush=True)
            continue
        if rot == "smooth" and smoothed is None:
            smoothed = apply_transforms(loaded, [Smooth("re:.*", 0.5, args.smooth_calib)])
        model_l = {False: loaded, True: rotated, "smooth": smoothed}[rot]
        ts = {False: [], True: list(ROT), "smooth": [Smooth("re:.*", 0.5, args.smooth_calib)]}[rot]
        resolved = plan_for(w, a, ts).resolve(loaded.model)
        t0 = time.perf_counter()
        grams = calibration_grams(model_l, resolved.gram_layers, "wiki", args.calib_seqs, 512, progress=False)
        res = evaluate(
            loaded,
            resolved,
            text="wikitext2",
            seq_len=512,
            max_tokens=args.tokens,
            grams=grams,
            progress=False,
            transformed=model_l if ts else None,
        )
        results[key] = {**res.to_json(), "weights": w, "act": a, "wall_s": time.perf_counter() - t0}
        save(out, results)
        took = time.perf_counter() - t0
        elapsed = time.perf_counter() - args.t_start
        print(
            key,
            f"ppl {res.ppl:.3f} kl {res.kl:.4f} top1 {res.top1:.4f} ({took:.1f} s, {elapsed:.0f} s in all)",
            flush=True,
        )


def fusion_only(loaded, args, results: dict, out: Path) -> None:
    """W4A16 RTN on the model with its RMSNorm scales fused into the linears and no rotation (Q = I)."""
    import copy
    import dataclasses

    from workbench.transform.rotate import rotate_residual

    key = "W4A16 RTN, RMSNorm fused only (Q = I)"
    if key in results:
        print(key, results[key])
        return
    if over_budget(args):
        print(key, "skipped (budget)", flush=True)
        return
    t0 = time.perf_counter()
    model = copy.deepcopy(loaded.model)
    eye = torch.eye(loaded.description.hidden_size, dtype=torch.float64, device=loaded.device)
    rotate_residual(model, eye)
    model.workbench_transforms = (ROT[0],)
    fused = dataclasses.replace(loaded, model=model)
    resolved = plan_for("int4_g128", None, [ROT[0]]).resolve(loaded.model)
    res = evaluate(
        loaded, resolved, text="wikitext2", max_tokens=args.tokens, progress=False, transformed=fused
    )
    results[key] = {**res.to_json(), "weights": "int4_g128", "act": None, "wall_s": time.perf_counter() - t0}
    save(out, results)
    print(key, f"ppl {res.ppl:.3f} kl {res.kl:.4f} top1 {res.top1:.4f}", flush=True)


def report(results: dict) -> str:
    """Markdown tables of a results file (the run, the quality rows, the outlier statistics, equivalence)."""
    meta = results.get("meta", {})
    first = next((r for r in results.values() if "ppl" in r), None)
    lines = [
        f"model {meta.get('model')}, device {meta.get('device', 'cpu')} ({meta.get('device_name', '')}), "
        f"dtype {meta.get('dtype', 'float32')}, torch {meta.get('torch')}"
        + (
            f"; {first['n_tokens']} predicted tokens ({first['n_windows']} windows of {first['seq_len']} of "
            f"{first['text']}), reference PPL {first['ref_ppl']:.3f}"
            if first
            else ""
        ),
        "",
    ]
    lines += [
        "| configuration | weights | input | PPL | KL (nats/token) | top-1 | without → with Hadamard (KL) |"
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for key, r in results.items():
        if "ppl" not in r or key.endswith("+hadamard"):
            continue
        rot = results.get(f"{key} +hadamard")
        rows = [(key, r)] + ([(f"{key} +hadamard", rot)] if rot else [])
        for k, x in rows:
            change = f"{r['kl']:.4f} → {rot['kl']:.4f}" if rot and k == key else ""
            lines.append(
                f"| {k} | {x['weights']} | {x['act'] or 'bf16'} | {x['ppl']:.3f} | {x['kl']:.4f} | "
                f"{100 * x['top1']:.2f}% | {change} |"
            )
    lines += [
        "",
        "| layer input | kurtosis before | after | max/median before | after | absmax before | after |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for name, ba in results.get("outliers", {}).items():
        b, a = ba["before"], ba["after"]
        lines.append(
            f"| {name} | {b['kurtosis']:,.1f} | {a['kurtosis']:,.1f} | {b['max_median']:,.1f} | "
            f"{a['max_median']:,.2f} | {b['absmax']:,.1f} | {a['absmax']:,.1f} |"
        )
    lines += ["", "| equivalence check (fp32) | max abs Δlogit | max abs logit |", "|---|---|---|"]
    for key, r in results.items():
        if key.startswith("equivalence "):
            name = key[len("equivalence ") :]
            lines.append(f"| {name} | {r['max_abs_dlogit']:.2e} | {r['max_abs_logit']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--calib-seqs", type=int, default=32)
    p.add_argument("--smooth-calib", type=int, default=16)
    p.add_argument("--out", default="rotations.json")
    p.add_argument("--block", type=int, default=11, help="block whose inputs the outlier step measures")
    p.add_argument("--skip", default="", help="steps to skip: equivalence,outliers,quality,fusion")
    p.add_argument("--only", default="", help="comma list of configuration names to run (default: all)")
    p.add_argument("--report", action="store_true", help="only print the markdown tables of --out")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    args = p.parse_args()
    args.t_start = time.perf_counter()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    if args.report:
        print(report(results))
        return
    device = pick_device(args.device)
    torch.set_float32_matmul_precision("highest")  # fp32 matmuls stay fp32 on the GPU (no TF32): module doc
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    meta = {"model": args.model, "tokens": args.tokens, "torch": torch.__version__, "device": device}
    meta.update(device_name=name, dtype="float32", calib_seqs=args.calib_seqs)
    meta["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results.setdefault("meta", meta)
    loaded = load_model(args.model, device=device, progress=False)
    took = time.perf_counter() - args.t_start
    print(f"loaded {args.model} on {device} ({name}) in {took:.1f} s", flush=True)
    skip = set(args.skip.split(","))
    if "equivalence" not in skip:
        equivalence(loaded, results, out, args.smooth_calib)
    rotated = apply_transforms(loaded, list(ROT))
    if "outliers" not in skip:
        outliers(loaded, rotated, results, out, args.block)
    if "quality" not in skip:
        quality(loaded, rotated, args, results, out)
    if "fusion" not in skip:
        fusion_only(loaded, args, results, out)


if __name__ == "__main__":
    main()
