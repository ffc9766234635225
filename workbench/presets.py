"""Model shapes by name: the configurations that the GPU benchmarks build with random weights.

One place for each shape, so the benchmarks measure the same models: Llama-3-8B (hidden 4096, FFN 14336,
32 blocks, 32 heads / 8 KV heads, vocab 128256, from
https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json; bench_e2e.py,
bench_inspect_gpu.py, bench_sensitivity_gpu.py) and SmolLM2-135M, the default model's shape
(https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json; bench_sensitivity_gpu.py).
"""

from __future__ import annotations

from workbench.errors import WorkbenchError

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
# Llama-3-70B (https://huggingface.co/meta-llama/Meta-Llama-3-70B/blob/main/config.json): the streamed
# synthetic model of issue 18 (workbench/streaming/source.py, bench_70b_stream.py)
LLAMA3_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# the same structure at a size the CPU tests and the benchmark's --tiny run in seconds
TINY_LLAMA = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
PRESETS = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B, "smollm2-135m": SMOLLM2_135M}


def llama_config(name: str = "llama3-8b", **overrides):
    """A transformers `LlamaConfig` of the preset `name`, with `overrides` (e.g. num_hidden_layers=4)."""
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise WorkbenchError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    return LlamaConfig(**{**PRESETS[name], **overrides})
