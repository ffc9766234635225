"""Model shapes by name: the Llama-3-8B configuration that the GPU benchmarks build with random weights.

One place for the shape (hidden 4096, FFN 14336, 32 blocks, 32 heads / 8 KV heads, vocab 128256, from
https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json), so benchmarks/bench_e2e.py,
bench_inspect_gpu.py and bench_sensitivity_gpu.py measure the same model.
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
PRESETS = {"llama3-8b": LLAMA3_8B}


def llama_config(name: str = "llama3-8b", **overrides):
    """A transformers `LlamaConfig` of the preset `name`, with `overrides` (e.g. num_hidden_layers=4)."""
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise WorkbenchError(f"unknown model preset '{name}' (known: {', '.join(PRESETS)})")
    return LlamaConfig(**{**PRESETS[name], **overrides})
