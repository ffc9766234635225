"""Sensitivity scan speed on a GPU: proxy scan of a Llama-3-8B-shaped model, and the kl scan of `default`.

    python benchmarks/bench_sensitivity_gpu.py            # on the GPU machine (target: proxy < 60 s)
    python benchmarks/bench_sensitivity_gpu.py --tiny     # small shapes on the CPU (a smoke test)

Part 1 - Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 blocks, 32 heads / 8 kv heads, vocab 128256),
random bf16 weights built directly on the device (no checkpoint exists here). The proxy needs each layer's
Gram matrix G = X^T X: we compute real ones, block by block, from a small random-token calibration batch
(`--calib-seqs` x `--calib-seq-len`) with the workbench's own layer-by-layer statistics runner
(`collect_activation_stats(mode="layerwise", gram_sink=...)`). Each block's Grams are consumed by the sink as
soon as they are complete and then dropped, so only one block's Grams (~1 GB for the 14336-wide down_proj in
fp32) are alive at a time. For every layer x spec the weight is fake-quantized on the device (the same RTN
encode/decode functions as `quant.api.fake_quant`) and scored with tr(D G D^T) / tr(W G W^T). Reported:
Gram time, proxy time, and their total. Random weights make the costs meaningless; the timing is the point.

Part 2 - `default` (SmolLM2-135M, fp32) on the device: the plain proxy, the Fisher-weighted proxy and the full
measured-KL scan over the same 6 specs, with the CPU benchmark's scan batch (2 x 256 tokens of `wiki`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SPECS = ["int2_g64", "int3_g128", "int4_g128", "int8_ch", "nvfp4", "fp8_e4m3"]
_GROUP = {
    "q": "qkv",
    "k": "qkv",
    "v": "qkv",
    "gate": "gu",
    "up": "gu",
    "o": "o",
    "down": "down",
    "lm_head": "head",
    "other": "other",
}


def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def fake_quant_on_device(W, spec):
    """RTN fake quantization that stays on W's device (quant.api moves weights to the CPU)."""
    from workbench.quant.formats import ungrouped
    from workbench.quant.registry import decode
    from workbench.quant.rtn import rtn_quantize

    N, K = W.shape
    return ungrouped(decode(spec, rtn_quantize(W, spec)), spec, N, K)


def build_llama(tiny: bool, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(
            hidden_size=256,
            intermediate_size=896,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=4096,
            max_position_embeddings=2048,
        )
    else:
        from workbench.presets import llama_config

        cfg = llama_config("llama3-8b")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    return model.eval(), cfg


def proxy_scan_llama(tiny: bool, device: str, calib_seqs: int, calib_seq_len: int) -> dict:
    import torch

    from workbench.model.inventory import get_linear_weight, get_module, layer_inventory
    from workbench.quant.metrics import quadratic_form
    from workbench.quant.spec import QuantSpec
    from workbench.stats.activations import collect_activation_stats

    t0 = time.perf_counter()
    model, cfg = build_llama(tiny, device)
    _sync(device)
    t_build = time.perf_counter() - t0
    layers = layer_inventory(model)
    by_group: dict[tuple, list] = {}
    for x in layers:
        by_group.setdefault((x.block, _GROUP[x.role]), []).append(x)
    specs = [QuantSpec.parse(s) for s in SPECS]
    cost: dict[str, dict[str, float]] = {}
    t_proxy = [0.0]

    @torch.no_grad()
    def sink(leader: str, gram: torch.Tensor) -> None:
        _sync(device)
        t = time.perf_counter()
        lead = next(x for x in layers if x.name == leader)
        G = gram.to(device, torch.float32)
        for x in by_group[(lead.block, _GROUP[lead.role])]:
            W = get_linear_weight(get_module(model, x.name)).float()
            den = float(quadratic_form(W, G).sum())
            cost[x.name] = {
                str(s): float(quadratic_form(W - fake_quant_on_device(W, s), G).sum()) / den for s in specs
            }
        _sync(device)
        t_proxy[0] += time.perf_counter() - t

    batches = torch.randint(
        0, cfg.vocab_size, (calib_seqs, calib_seq_len), generator=torch.Generator().manual_seed(0)
    )
    t1 = time.perf_counter()
    collect_activation_stats(
        model, batches, mode="layerwise", gram=True, progress=False, gram_sink=sink, batch_size=calib_seqs
    )
    _sync(device)
    total = time.perf_counter() - t1
    assert len(cost) == len(layers), f"scored {len(cost)} of {len(layers)} layers"
    mean = {str(s): sum(c[str(s)] for c in cost.values()) / len(cost) for s in specs}
    return {
        "model": "Llama-3-8B shapes (random bf16)" if not tiny else "tiny Llama (random bf16)",
        "layers": len(layers),
        "specs": SPECS,
        "calib_tokens": calib_seqs * calib_seq_len,
        "build_s": t_build,
        "scan_total_s": total,
        "proxy_s": t_proxy[0],
        "grams_s": total - t_proxy[0],
        "mean_cost": mean,
    }


def _default_shaped(device: str):
    """SmolLM2-135M's exact architecture with random weights and the stories260K tokenizer (timing only:
    scan cost depends on shapes; costs and rank correlations of this model mean nothing)."""
    import torch
    from transformers import LlamaForCausalLM

    from workbench.model.llama2c import Llama2cTokenizer
    from workbench.model.loading import LoadedModel, _describe
    from workbench.model.tokenizer import Tokenizer
    from workbench.paths import data_dir
    from workbench.presets import llama_config

    cfg = llama_config("smollm2-135m")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    tok = Tokenizer(Llama2cTokenizer(data_dir() / "models" / "stories260K" / "tok512.bin"))
    desc = _describe(model, "default-shaped", "random weights (SmolLM2-135M shapes)", [])
    desc.name = "SmolLM2-135M shapes (random fp32)"
    return LoadedModel(model=model, tokenizer=tok, description=desc)


def default_scans(tiny: bool, device: str, work: Path) -> dict:
    from workbench.errors import WorkbenchError
    from workbench.measure.sensitivity import sensitivity_scan
    from workbench.model.loading import load_model

    if tiny:
        from workbench.paths import data_dir

        src = data_dir() / "models" / "stories260K" / "stories260K.bin"
        text = work / "stories.txt"
        text.write_text((data_dir() / "calibration" / "tinystories.txt").read_text()[:4000])
        loaded = load_model(str(src), device=device, progress=False)
        kw = dict(text=str(text), n_seqs=2, seq_len=64, calib_seqs=4, calib_seq_len=64)
        specs = ["int2_g32", "int3_g32", "int4_g32", "int8_ch", "nvfp4", "fp8_e4m3"]
    else:
        try:
            loaded = load_model("default", device=device, progress=False)
        except WorkbenchError as exc:  # the GPU machine: the 98 MB GGUF cannot travel (64 MiB cap)
            print(f"default model unavailable ({exc}); timing a SmolLM2-135M-shaped random model", flush=True)
            loaded = _default_shaped(device)
        kw = dict(text="wiki", n_seqs=2, seq_len=256, calib_seqs=32, calib_seq_len=512)
        specs = SPECS
    out = {"model": loaded.description.name, "settings": kw}
    for name, method, imp in [
        ("proxy", "proxy", "none"),
        ("fisher", "proxy", "fisher"),
        ("kl", "kl", "none"),
    ]:
        path = work / f"{name}.json"
        path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        tab = sensitivity_scan(loaded, specs, method, out=path, importance=imp, progress=False, **kw)
        out[name] = {
            "layers": len(tab.layers),
            "wall_s": time.perf_counter() - t0,
            "setup_s": tab.timing.get("setup", 0.0),
            "scan_s": tab.timing.get("scan", 0.0),
        }
    from scipy.stats import spearmanr

    from workbench.measure.sensitivity import SensitivityTable

    kl = SensitivityTable.load(work / "kl.json")
    for name in ("proxy", "fisher"):
        t = SensitivityTable.load(work / f"{name}.json")
        a = [t.cost[x.name][s] for x in kl.layers for s in kl.specs]
        b = [kl.cost[x.name][s] for x in kl.layers for s in kl.specs]
        out[f"spearman_{name}_kl"] = float(spearmanr(a, b).statistic)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shapes, CPU by default (smoke test)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument("--calib-seqs", type=int, default=4)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-default", action="store_true")
    ap.add_argument("--work", default=None, help="folder for the default-model tables (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    import tempfile

    import torch

    device = args.device or ("cpu" if args.tiny else "cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny (CPU) or on the GPU machine", file=sys.stderr)
        return 2
    calib_len = min(args.calib_seq_len, 64) if args.tiny else args.calib_seq_len
    res = {"device": torch.cuda.get_device_name(0) if torch.device(device).type == "cuda" else "cpu"}
    if not args.skip_llama:
        res["llama"] = proxy_scan_llama(args.tiny, device, args.calib_seqs, calib_len)
        r = res["llama"]
        print(
            f"{r['model']}: proxy scan of {r['layers']} layers x {len(r['specs'])} specs in "
            f"{r['scan_total_s']:.1f} s (Grams {r['grams_s']:.1f} s from {r['calib_tokens']} tokens, proxy "
            f"{r['proxy_s']:.1f} s; model built in {r['build_s']:.1f} s) on {res['device']}",
            flush=True,
        )
    if not args.skip_default:
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sens_gpu_"))
        work.mkdir(parents=True, exist_ok=True)
        res["default"] = d = default_scans(args.tiny, device, work)
        for k in ("proxy", "fisher", "kl"):
            print(
                f"{d['model']} {k} scan: {d[k]['layers']} layers x 6 specs, {d[k]['wall_s']:.1f} s "
                f"(setup {d[k]['setup_s']:.1f} s, scan {d[k]['scan_s']:.1f} s)",
                flush=True,
            )
        print(
            f"Spearman proxy/kl {d['spearman_proxy_kl']:.3f}, fisher/kl {d['spearman_fisher_kl']:.3f}; "
            f"tables in {work}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
