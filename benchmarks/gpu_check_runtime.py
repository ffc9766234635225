"""GPU agreement checks of the quantized runtime (run on the device machine; writes JSON).

On stories260K (the default model cannot travel to the GPU machine), for several plans:
* KL(P_cpu_ref || P_gpu_kernel), mean over 4,096 tokens of TinyStories text: the CPU torch reference in
  float32 against the Triton kernels with fp16 activations (the whole model in fp16 on the GPU); also the
  GPU reference path in fp16 against the GPU kernels, which isolates the kernels from fp16 activations;
* greedy text: 64 tokens from the int8 plan on the GPU (CUDA-graph decoder) against the unquantized model
  on the CPU (fp32) and on the GPU (fp16).

Usage: python benchmarks/gpu_check_runtime.py --model PATH/stories260K.bin --text PATH/tinystories.txt --out F
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def _names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def plans(model) -> dict[str, dict[str, str]]:
    names = _names(model)
    cycle = ["int4_g32", "int3_g64_sym", "int2_g32", "int8_ch", "fp8_e4m3", "int4_ch", "int8_g128_sym"]
    return {
        "int8_ch": {n: "int8_ch" for n in names},
        "int4_g32": {n: "int4_g32" for n in names},
        "int3_g64": {n: "int3_g64" for n in names},
        "mixed": {n: cycle[i % len(cycle)] for i, n in enumerate(names)},
    }


@torch.no_grad()
def logprobs(model, windows: torch.Tensor, device: str) -> torch.Tensor:
    """log-softmax float64 [n, L, V] of the model over token windows [n, L]."""
    out = [torch.log_softmax(model(w[None].to(device)).logits.double(), -1).cpu() for w in windows]
    return torch.cat(out)


def mean_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """mean over tokens of KL(P || Q) in nats."""
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of the script)")
    a = ap.parse_args()
    dev, mode = a.device, ("graph" if a.device == "cuda" else "eager")
    half = (lambda m: m.to(dev).half()) if dev == "cuda" else (lambda m: m)
    from workbench.data import tokenize_text
    from workbench.loading import load_model
    from workbench.runtime.apply import apply_plan
    from workbench.runtime.decode import StaticDecoder

    loaded = load_model(a.model, progress=False)
    base = loaded.model
    seq = 512
    # llama2.c's BPE is pure Python and slow on long text: tokenize just enough characters, or read
    # ids tokenized ahead (a JSON list, --text ending in .ids.json)
    if a.text.endswith(".ids.json"):
        ids = torch.tensor(json.load(open(a.text)), dtype=torch.long)
    else:
        ids = tokenize_text(loaded.tokenizer, open(a.text).read()[: 12 * a.tokens])
    assert ids.numel() >= a.tokens, f"only {ids.numel()} tokens in {a.text}"
    n = a.tokens // seq
    windows = ids[: n * seq].reshape(n, seq)
    res = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "model": "stories260K",
        "tokens": int(windows.numel()),
        "plans": {},
    }
    for name, plan in plans(base).items():
        cpu = copy.deepcopy(base)
        apply_plan(cpu, plan)
        gpu = half(copy.deepcopy(base))
        apply_plan(gpu, plan)
        gref = half(copy.deepcopy(base))
        apply_plan(gref, plan, backend="reference", warn=False)
        p_cpu = logprobs(cpu, windows, "cpu")
        p_gpu = logprobs(gpu, windows, dev)
        p_gref = logprobs(gref, windows, dev)
        res["plans"][name] = {
            "kl_cpu_ref_vs_gpu_kernel": mean_kl(p_cpu, p_gpu),
            "kl_gpu_ref_fp16_vs_gpu_kernel": mean_kl(p_gref, p_gpu),
            "kl_cpu_ref_vs_gpu_ref_fp16": mean_kl(p_cpu, p_gref),
            "top1_agree_cpu_vs_gpu": float((p_cpu.argmax(-1) == p_gpu.argmax(-1)).double().mean()),
        }
        print(name, res["plans"][name], flush=True)
        del cpu, gpu, gref
    # greedy text at int8
    prompt = loaded.tokenizer.encode("Once upon a time", add_bos=True)
    ref_cpu = StaticDecoder(base, 128, "eager").generate(prompt, 64).tokens
    fp16 = half(copy.deepcopy(base))
    ref_gpu = StaticDecoder(fp16, 128, mode).generate(prompt, 64).tokens
    q = half(copy.deepcopy(base))
    apply_plan(q, plans(base)["int8_ch"])
    q_tokens = StaticDecoder(q, 128, mode).generate(prompt, 64).tokens
    hf = q.generate(torch.tensor([prompt], device=dev), max_new_tokens=64, do_sample=False)[0, len(prompt) :]
    res["greedy_int8"] = {
        "same_as_cpu_fp32": q_tokens == ref_cpu,
        "same_as_gpu_fp16": q_tokens == ref_gpu,
        "graph_same_as_hf_generate": q_tokens == hf.tolist(),
        "text_int8_gpu": loaded.tokenizer.decode(q_tokens),
        "text_fp32_cpu": loaded.tokenizer.decode(ref_cpu),
    }
    print(json.dumps(res["greedy_int8"], indent=1), flush=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
