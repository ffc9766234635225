"""llama.cpp tensor-type export: names, type mapping, block fallbacks, a file llama-quantize parses."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from workbench.errors import WorkbenchError
from workbench.export.llama_cpp import gguf_type, llama_cpp_export, llama_cpp_tensor_types
from workbench.model.inventory import layer_inventory
from workbench.plan.plan import Plan, Rule


@pytest.mark.parametrize(
    "spec,expect",
    [
        ("bf16", "bf16"),
        ("fp16", "f16"),
        ("int8_ch", "q8_0"),
        ("fp8_e4m3", "q8_0"),
        ("int6_g64", "q6_K"),
        ("int5_g32", "q5_K"),
        ("int4_g128:gptq", "q4_K"),
        ("nf4_g64", "iq4_nl"),
        ("mxfp4", "mxfp4"),
        ("nvfp4", "mxfp4"),
        ("int3_g128", "q3_K"),
        ("int2_g64", "q2_K"),
    ],
)
def test_type_mapping(spec, expect):
    assert gguf_type(spec) == expect


def _parse_like_llama_quantize(text: str) -> list[tuple[str, str]]:
    """What tools/quantize does: whitespace-separated name=type tokens, names lower-cased."""
    out = []
    for tok in text.split():
        name, sep, typ = tok.partition("=")
        assert sep and name and typ, f"token {tok!r} would be refused"
        out.append((name.lower(), typ))
    return out


def test_export_stories(stories):
    layers = layer_inventory(stories.model)
    plan = Plan(
        default="int4_g32",
        rules=[
            Rule("role:down", "int8_ch"),
            Rule("model.layers.0.self_attn.k_proj", "int2_g32"),
            Rule("lm_head", "bf16"),
        ],
    )
    ex = llama_cpp_export(plan.resolve(layers), layers)
    pairs = _parse_like_llama_quantize(ex.text)
    assert len(pairs) == len(layers) == len(ex.rows)
    names = [
        "blk.%d.%s.weight" % (b, t)
        for b in range(5)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    ] + ["token_embd.weight"]
    # each pattern matches exactly its own tensor among all names (regex_search semantics)
    for (pat, _), want in zip(pairs, names):
        assert [n for n in names if re.search(pat, n)] == [want]
    types = dict(zip(names, (t for _, t in pairs)))
    # rows of 64 (and 172 for down) are not multiples of 256: K-quants fall back as llama.cpp would
    assert types["blk.0.attn_q.weight"] == "q5_0"  # int4 -> q4_K -> q5_0
    assert types["blk.0.attn_k.weight"] == "iq4_nl"  # int2 -> q2_K -> iq4_nl
    assert types["blk.3.ffn_down.weight"] == "f16"  # int8 -> q8_0 needs 32 | 172 -> f16
    assert types["token_embd.weight"] == "bf16"  # tied lm_head
    assert any("tied" in n for n in ex.notes) and any("q2_K" in n for n in ex.notes)
    assert llama_cpp_tensor_types(plan.resolve(layers), layers) == ex.text


def test_export_8b_shapes_keep_k_quants(stories):
    layers = [
        replace(x, in_features=4096 if x.role != "down" else 14336) for x in layer_inventory(stories.model)
    ]
    ex = llama_cpp_export(
        Plan(default="int3_g128", rules=[Rule("lm_head", "int8_ch")]).resolve(layers), layers
    )
    types = [t for _, t in _parse_like_llama_quantize(ex.text)]
    assert types[:-1] == ["q3_K"] * (len(layers) - 1) and types[-1] == "q8_0"
    assert not any("cannot use" in n for n in ex.notes)


def test_export_refuses_unknown_roles(stories):
    layers = layer_inventory(stories.model)
    odd = [replace(layers[0], name="model.proj", role="other", block=None)]
    with pytest.raises(WorkbenchError, match="layer model.proj .* no llama.cpp tensor name"):
        llama_cpp_export({"model.proj": "int4_g32"}, odd)
