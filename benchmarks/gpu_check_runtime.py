"""GPU agreement checks of the quantized runtime (run on the device machine; writes JSON).

On a real model (stories260K, or `default` = SmolLM2-135M from its GGUF), for each plan given:
* KL(P_cpu_ref || P_gpu), mean over --tokens tokens of text (ids tokenized ahead, a JSON list): the CPU torch
  reference in float32 against the GPU model with fp16 activations, through the transformers model with the
  Triton kernels ("hf") and through the fast path's prefill math ("fast", fused q/k/v and gate/up); also
  the GPU reference path in fp16 against the GPU kernels, which isolates the kernels from fp16 activations;
* greedy text (--greedy plan, 64 tokens): the fast path (CUDA graph, and compiled) and the HF path on the
  GPU against the unquantized and the quantized model on the CPU (fp32);
* --speed: decode tokens/s and the step breakdown of the fast and HF paths in bf16 for bf16 and int4_g128
  (a 135M model is launch-bound: where its step time goes).

Usage: python benchmarks/gpu_check_runtime.py --model PATH(.bin|.gguf) --text IDS.json --out F [--speed]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

CYCLE = ["int4_g32", "int3_g64_sym", "int2_g32", "int8_ch", "fp8_e4m3", "int4_ch", "int8_g128_sym"]


def _names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def plan_for(model, name: str) -> dict[str, str]:
    """{layer: spec}: a uniform spec, or "mixed" (a cycle of int2/3/4/8 and fp8 over the layers)."""
    names = _names(model)
    if name == "mixed":
        return {n: CYCLE[i % len(CYCLE)] for i, n in enumerate(names)}
    return {n: name for n in names}


@torch.no_grad()
def logprobs(fn, windows: torch.Tensor) -> torch.Tensor:
    """log-softmax float64 [n, L, V] of fn(window [L]) -> logits [L, V] over token windows [n, L]."""
    return torch.cat([torch.log_softmax(fn(w).double(), -1).cpu()[None] for w in windows])


def mean_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """mean over tokens of KL(P || Q) in nats."""
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def hf_fn(model, dev):
    return lambda w: model(w[None].to(dev)).logits[0]


def fast_fn(model, seq: int):
    from workbench.runtime.fastpath import FastDecoder

    dec = FastDecoder(model, max_cache_len=seq, mode="eager")
    return lambda w: dec.logits(w)


def check_plan(base, name: str, windows, dev: str) -> dict:
    from workbench.runtime.apply import apply_plan

    plan = plan_for(base, name)
    cpu = copy.deepcopy(base)
    apply_plan(cpu, plan)
    gpu = copy.deepcopy(base).to(dev).half()
    apply_plan(gpu, plan)
    gref = copy.deepcopy(base).to(dev).half()
    apply_plan(gref, plan, backend="reference", warn=False)
    p_cpu = logprobs(hf_fn(cpu, "cpu"), windows)
    p_gpu = logprobs(hf_fn(gpu, dev), windows)
    p_fast = logprobs(fast_fn(gpu, windows.shape[1]), windows)
    p_gref = logprobs(hf_fn(gref, dev), windows)
    return {
        "kl_cpu_ref_vs_gpu_kernel_hf": mean_kl(p_cpu, p_gpu),
        "kl_cpu_ref_vs_gpu_kernel_fast": mean_kl(p_cpu, p_fast),
        "kl_gpu_ref_fp16_vs_gpu_kernel": mean_kl(p_gref, p_gpu),
        "kl_cpu_ref_vs_gpu_ref_fp16": mean_kl(p_cpu, p_gref),
        "top1_agree_cpu_vs_gpu_fast": float((p_cpu.argmax(-1) == p_fast.argmax(-1)).double().mean()),
    }


def check_greedy(base, tok, name: str, dev: str, n: int = 64) -> dict:
    from workbench.runtime.apply import apply_plan
    from workbench.runtime.decode import make_decoder

    prompt = (
        tok.prompt_ids("Once upon a time") if hasattr(tok, "prompt_ids") else tok.encode("Once upon a time")
    )
    L = len(prompt) + n + 1
    ref_cpu = make_decoder(base, L, "eager", "hf").generate(prompt, n).tokens
    qcpu = copy.deepcopy(base)
    apply_plan(qcpu, plan_for(base, name))
    q_cpu = make_decoder(qcpu, L, "eager", "hf").generate(prompt, n).tokens
    q = copy.deepcopy(base).to(dev).half()
    apply_plan(q, plan_for(base, name))
    out = {"plan": name, "prompt": prompt, "text_fp32_cpu": tok.decode(ref_cpu)}
    runs = (
        (("fast", "graph"), ("fast", "compile"), ("hf", "graph")) if dev == "cuda" else (("fast", "eager"),)
    )
    for path, mode in runs:
        r = make_decoder(q, L, mode, path).generate(prompt, n)
        out[f"{path}_{mode}_same_as_cpu_fp32"] = r.tokens == ref_cpu
        out[f"{path}_{mode}_same_as_cpu_quantized"] = r.tokens == q_cpu
        out[f"{path}_{mode}_text"] = tok.decode(r.tokens)
    return out


def speed(base, dev: str, n: int = 128) -> dict:
    from workbench.runtime.apply import apply_plan
    from workbench.runtime.decode import make_decoder
    from workbench.runtime.profile import step_breakdown

    prompt = list(range(1, 33))
    out = {}
    for name in ("bf16", "int4_g128"):
        m = copy.deepcopy(base).to(dev, torch.bfloat16)
        if name != "bf16":
            apply_plan(m, plan_for(base, name))
        for path, mode in (("fast", "graph"), ("fast", "compile"), ("hf", "graph")):
            dec = make_decoder(m, len(prompt) + n + 8, mode, path)
            dec.generate(prompt, 8)
            tps = sorted(dec.generate(prompt, n).decode_tokens_per_s for _ in range(3))[1]
            out[f"{name} {path}:{mode}"] = {"tokens_per_s": tps, "breakdown": step_breakdown(dec, prompt)}
            print(
                name, path, mode, round(tps, 1), out[f"{name} {path}:{mode}"]["breakdown"]["ms"], flush=True
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="stories260K .bin or a .gguf file")
    ap.add_argument("--text", required=True, help="token ids tokenized ahead (JSON list)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--plans", default="int8_ch,int4_g32,int3_g64,mixed")
    ap.add_argument("--greedy", default="int8_ch")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of the script)")
    a = ap.parse_args()
    dev = a.device
    from workbench.model.loading import load_model

    loaded = load_model(a.model, progress=False)
    base = loaded.model
    ids = torch.tensor(json.load(open(a.text)), dtype=torch.long)
    assert ids.numel() >= a.tokens, f"only {ids.numel()} tokens in {a.text}"
    n = a.tokens // a.seq
    windows = ids[: n * a.seq].reshape(n, a.seq)
    res = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": loaded.description.name,
        "tokens": int(windows.numel()),
        "plans": {},
    }
    for name in [p for p in a.plans.split(",") if p]:
        res["plans"][name] = check_plan(base, name, windows, dev)
        print(name, res["plans"][name], flush=True)
    if a.greedy:
        res["greedy"] = check_greedy(base, loaded.tokenizer, a.greedy, dev)
        print(json.dumps(res["greedy"], indent=1), flush=True)
    if a.speed:
        res["speed"] = speed(base, dev)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
