"""Layer inventory on Llama (stories260K, default) and GPT-2-style Conv1D models."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.model.inventory import get_linear_weight, layer_inventory


def test_stories_inventory(stories):
    layers = layer_inventory(stories.model)
    assert len(layers) == 5 * 7 + 1
    by_role = {}
    for x in layers:
        by_role.setdefault(x.role, []).append(x)
    assert {r: len(v) for r, v in by_role.items()} == {
        "q": 5,
        "k": 5,
        "v": 5,
        "o": 5,
        "gate": 5,
        "up": 5,
        "down": 5,
        "lm_head": 1,
    }
    assert by_role["k"][0].shape == (32, 64) and by_role["down"][3].shape == (64, 172)
    assert by_role["down"][3].block == 3 and by_role["lm_head"][0].block is None
    assert by_role["lm_head"][0].tied and not any(x.tied for x in layers if x.role != "lm_head")


@pytest.mark.slow
def test_default_inventory(default_model):
    layers = layer_inventory(default_model.model)
    assert len(layers) == 30 * 7 + 1
    shapes = {x.role: x.shape for x in layers}
    assert shapes == {
        "q": (576, 576),
        "k": (192, 576),
        "v": (192, 576),
        "o": (576, 576),
        "gate": (1536, 576),
        "up": (1536, 576),
        "down": (576, 1536),
        "lm_head": (49152, 576),
    }
    assert [x.block for x in layers[:-1]] == [b for b in range(30) for _ in range(7)]
    assert layers[-1].tied


def test_gpt2_conv1d_inventory():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=16))
    layers = layer_inventory(model)
    roles = [(x.name, x.role, x.shape, x.kind) for x in layers]
    assert roles[:4] == [
        ("transformer.h.0.attn.c_attn", "other", (96, 32), "conv1d"),
        ("transformer.h.0.attn.c_proj", "o", (32, 32), "conv1d"),
        ("transformer.h.0.mlp.c_fc", "up", (128, 32), "conv1d"),
        ("transformer.h.0.mlp.c_proj", "down", (32, 128), "conv1d"),
    ]
    assert layers[-1].role == "lm_head" and layers[-1].tied
    mod = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 32)
    assert torch.allclose(mod(x), x @ get_linear_weight(mod).T + mod.bias, atol=1e-5)


def test_model_without_linear_layers():
    with pytest.raises(WorkbenchError, match="no linear layers"):
        layer_inventory(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4)))
