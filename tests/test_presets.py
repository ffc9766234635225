"""The one Llama-3-8B shape the GPU benchmarks build (workbench/presets.py)."""

from __future__ import annotations

import pytest

from workbench.errors import WorkbenchError
from workbench.presets import llama_config


def test_llama3_8b_preset_has_the_published_shape_and_takes_overrides():
    cfg = llama_config("llama3-8b", num_hidden_layers=4)
    shape = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert shape == (4096, 14336, 32, 8) and cfg.vocab_size == 128256 and cfg.num_hidden_layers == 4
    assert llama_config().num_hidden_layers == 32 and cfg.max_position_embeddings == 8192
    small = llama_config("smollm2-135m")
    assert (small.hidden_size, small.num_hidden_layers, small.vocab_size) == (576, 30, 49152)
    with pytest.raises(WorkbenchError, match="unknown model preset 'llama-9b'"):
        llama_config("llama-9b")
