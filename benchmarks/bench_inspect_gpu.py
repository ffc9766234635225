"""Layer-by-layer activation statistics on a Llama-3-8B-shaped model: wall time for 128 x 2048 tokens.

The model has the Llama-3-8B shape (hidden 4096, FFN 14336, 32 blocks, 32 heads / 8 KV heads, vocab 128256)
with random bf16 weights built directly on the device (nothing that large travels); statistics cost depends
only on shapes. The run is `collect_activation_stats(mode="layerwise")`: block 0's inputs are captured, then
each block runs over all batches while hooks stream absmax / mean / RMS / histograms / massive tokens and
the Gram X^T X of every distinct linear input (q/k/v share one, gate/up share one).

Grams: one block's Grams are 3 x 4096^2 + 14336^2 floats (~1 GB in fp32), 32 GB for the model, so they are
never all kept on the GPU. They live on the GPU in fp32 only while their block runs; when the block is done
`--grams cpu` copies each to host memory (fp32), `--grams drop` hands it to a sink that drops it (what a
streaming consumer such as GPTQ sees: it quantizes the block and frees the Gram), `--grams off` skips them.
bf16 inputs make the Gram exact up to fp32 accumulation (products of bf16 values are exact in fp32/TF32).

Printed: wall time of the statistics pass, the same batches through a plain forward of the whole model with
no hooks (baseline, same run), their ratio, tokens/s and peak GPU memory. Target: < 60 s on one H100.

    python benchmarks/bench_inspect_gpu.py                 # 128 x 2048 tokens on cuda
    python benchmarks/bench_inspect_gpu.py --tiny          # tiny config on the CPU, checks layerwise == full
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from workbench.presets import LLAMA3_8B

TINY = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def build_model(cfg: dict, device: str, seed: int = 0) -> torch.nn.Module:
    """LlamaForCausalLM of `cfg`, random bf16 weights (HF init), constructed on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def plain_forward(model, ids: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Seconds for the same batches through the whole model, no hooks, no logits kept."""
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, ids.shape[0], batch_size):
        model.model(input_ids=ids[s : s + batch_size].to(device), use_cache=False)
    _sync(device)
    return time.perf_counter() - t0


def run_stats(model, ids, batch_size, device, grams: str):
    """(seconds, stats, kept grams) of one layerwise statistics pass."""
    from workbench.stats.activations import collect_activation_stats

    kept: dict[str, torch.Tensor] = {}
    sink_s = [0.0]

    def to_host(name: str, g: torch.Tensor) -> None:
        t = time.perf_counter()
        kept[name] = g.to("cpu", torch.float32)
        sink_s[0] += time.perf_counter() - t

    sink = {"cpu": to_host, "drop": lambda name, g: None, "off": None}[grams]
    _sync(device)
    t0 = time.perf_counter()
    stats = collect_activation_stats(
        model,
        ids,
        mode="layerwise",
        device=device,
        gram=grams != "off",
        gram_sink=sink,
        batch_size=batch_size,
        progress=False,
    )
    _sync(device)
    return time.perf_counter() - t0, stats, kept, sink_s[0]


def check_tiny(model, ids, batch_size, device) -> None:
    """Layerwise == full on the tiny model (the statistics the GPU run times are the right ones)."""
    from workbench.stats.activations import collect_activation_stats

    full = collect_activation_stats(model, ids, mode="full", batch_size=batch_size, progress=False)
    _, lw, kept, _ = run_stats(model, ids, batch_size, device, "cpu")
    for name, a in full.items():
        b = lw[name]
        assert a.n_tokens == b.n_tokens == ids.numel(), name
        torch.testing.assert_close(a.absmax, b.absmax, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.rms, b.rms, rtol=1e-6, atol=1e-6)
        if a.shared_with is None:
            torch.testing.assert_close(a.gram, kept[name].double(), rtol=1e-5, atol=1e-4)
    print(f"tiny check: layerwise == full on {len(full)} layers")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (correctness, seconds)")
    ap.add_argument("--n-seqs", type=int, default=None, help="calibration sequences (default 128; tiny 6)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048; tiny 64)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default 8; tiny 4)")
    ap.add_argument("--grams", choices=("cpu", "drop", "off"), default="cpu", help="what happens to Grams")
    ap.add_argument("--device", default=None, help="default cuda (tiny: cpu)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain-forward baseline")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    tiny = args.tiny
    device = torch.device(args.device or ("cpu" if tiny else "cuda"))
    n = args.n_seqs or (6 if tiny else 128)
    L = args.seq_len or (64 if tiny else 2048)
    bs = args.batch_size or (4 if tiny else 8)
    cfg = TINY if tiny else LLAMA3_8B

    t0 = time.perf_counter()
    model = build_model(cfg, str(device))
    _sync(device)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (n, L), generator=g)
    if tiny:
        check_tiny(model, ids, bs, device)

    run_stats(model, ids[:bs, : min(L, 128)], bs, device, "drop")  # warm-up: CUDA context, cuBLAS
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    secs, stats, kept, sink_s = run_stats(model, ids, bs, device, args.grams)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    base = None if args.no_baseline else plain_forward(model, ids, bs, device)

    lead = [s for s in stats.values() if s.shared_with is None]
    assert all(torch.isfinite(s.absmax).all() for s in lead), "non-finite statistics"
    worst = max(lead, key=lambda s: float(s.outlier_ratio().max()))
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": "tiny" if tiny else "llama3-8b",
        "tokens": n * L,
        "n_seqs": n,
        "seq_len": L,
        "batch_size": bs,
        "grams": args.grams,
        "layers": len(stats),
        "distinct_inputs": len(lead),
        "build_s": round(build_s, 2),
        "stats_s": round(secs, 2),
        "baseline_forward_s": None if base is None else round(base, 2),
        "ratio_vs_forward": None if base is None else round(secs / base, 2),
        "tokens_per_s": round(n * L / secs),
        "peak_gpu_gib": round(peak, 2),
        "gram_to_host_s": round(sink_s, 2),
        "grams_kept_gib": round(sum(t.numel() * t.element_size() for t in kept.values()) / 2**30, 2),
        "most_outlier_input": worst.name,
    }
    print(
        f"layerwise statistics, {res['shape']} on {res['device']}: {n} x {L} tokens, batch {bs}, "
        f"grams={args.grams}"
    )
    print(f"  statistics pass      {secs:8.2f} s   ({res['tokens_per_s']} tokens/s; target < 60 s)")
    if base is not None:
        print(f"  plain forward        {base:8.2f} s   (ratio stats / forward = {secs / base:.2f})")
    print(
        f"  peak GPU memory      {peak:8.2f} GiB; Grams kept on the host {res['grams_kept_gib']} GiB "
        f"(copying them took {sink_s:.2f} s of the pass)"
    )
    print(f"  {len(stats)} layers, {len(lead)} distinct inputs; model built in {build_s:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
