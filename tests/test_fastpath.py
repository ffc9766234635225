"""The decode fast path (workbench.runtime.fastpath) against the Hugging Face model it reads, on stories260K:
same logits within float32 rounding, same greedy text, unquantized and quantized (fused and unfused groups);
fused linears equal to their parts; the plan-level fusion report; path selection."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.quant.api import quantize_weight
from workbench.quant.spec import QuantSpec
from workbench.runtime.apply import apply_plan
from workbench.runtime.decode import StaticDecoder, greedy_generate, make_decoder
from workbench.runtime.fastpath import FastDecoder, fast_path_reason
from workbench.runtime.fuse import fuse_reason, fused_op, linear, unfused_groups
from workbench.runtime.qlinear import QuantLinear


def _names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.fixture(scope="module")
def mixed(stories):
    """stories260K with int8 everywhere but block 2 at int4_g32 and block 3's v_proj at int4_g32."""
    plan = {n: "int8_ch" for n in _names(stories.model)}
    plan.update({n: "int4_g32" for n in plan if ".layers.2." in n})
    plan["model.layers.3.self_attn.v_proj"] = "int4_g32"
    plan["model.layers.1.mlp.up_proj"] = "bf16"
    model = copy.deepcopy(stories.model)
    report = apply_plan(model, plan)
    return model, report


def _check_same(model, tok, n: int = 60):
    ids = tok.encode("Once upon a time", add_bos=True)
    ref = StaticDecoder(model, 128, "eager").generate(ids, n)
    fast = FastDecoder(model, 128, "eager").generate(ids, n)
    assert fast.path == "fast" and ref.path == "hf"
    assert fast.tokens == ref.tokens, "greedy text differs from the transformers model"
    x = torch.tensor(ids + ref.tokens[:20])
    with torch.no_grad():
        want = model(x[None]).logits[0]
    got = FastDecoder(model, 128, "eager").logits(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    return fast


def test_fast_path_matches_hf_unquantized(stories):
    fast = _check_same(stories.model, stories.tokenizer)
    assert fast.notes == []
    assert "Lily" in stories.tokenizer.decode(fast.tokens)  # the story the model tells in fp32


def test_fast_path_matches_hf_mixed_plan_with_unfused_groups(stories, mixed):
    model, report = mixed
    fast = _check_same(model, stories.tokenizer, n=24)  # the CPU reference dequantizes per call: slow
    expected = [
        "model.layers.3.self_attn.{q_proj,k_proj,v_proj}: different specs (int8_ch / int8_ch / int4_g32)",
        "model.layers.1.mlp.{gate_proj,up_proj}: different specs (int8_ch / bf16)",
    ]
    assert sorted(report.unfused) == sorted(expected)
    assert sorted(n.removeprefix("not fused: ").split(":")[0] for n in fast.notes) == sorted(
        e.split(":")[0] for e in expected
    )  # same groups (on the CPU the kept layer is fp32, not the plan's bf16)


@pytest.mark.parametrize("spec", ["int4_g32", "int8_ch_sym", "int3_g64", "fp8_e4m3", "bf16"])
def test_fused_op_equals_its_parts(spec):
    torch.manual_seed(0)
    K = 96
    mods = []
    for N in (64, 32, 32):
        W = torch.randn(N, K)
        if spec == "bf16":
            lin = torch.nn.Linear(K, N, bias=False)
            lin.weight.data.copy_(W)
            mods.append(lin)
        else:
            mods.append(QuantLinear.from_quantized(quantize_weight(W, spec), name=f"l{N}"))
    assert fuse_reason(mods) is None
    op = fused_op(mods)
    assert op.splits == (64, 32, 32)
    x = torch.randn(5, K)
    assert torch.allclose(linear(op, x), torch.cat([m(x) for m in mods], -1), rtol=1e-5, atol=1e-4)


def test_fuse_reasons_name_the_mismatch():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    a = QuantLinear.from_quantized(quantize_weight(W, "int4_g32"), name="a")
    b = QuantLinear.from_quantized(quantize_weight(W, "int8_ch"), name="b")
    lin = torch.nn.Linear(64, 32)
    assert fuse_reason([a, b]) == "different specs (int4_g32 / int8_ch)"
    assert fuse_reason([a, lin]) == "different specs (int4_g32 / unquantized)"
    assert fuse_reason([lin, copy.deepcopy(lin).to(torch.bfloat16)]) == "different specs (unquantized / bf16)"
    nv = QuantLinear.from_quantized(quantize_weight(W, "nvfp4"), name="n")
    assert "no GPU kernel" in fuse_reason([nv, nv])
    specs = {f"model.layers.0.self_attn.{p}": QuantSpec.parse("int4_g128") for p in ("q_proj", "k_proj")}
    specs["model.layers.0.self_attn.v_proj"] = QuantSpec.parse("int4_g128:awq")
    assert unfused_groups(specs) == [
        "model.layers.0.self_attn.{q_proj,k_proj,v_proj}: different specs "
        "(int4_g128 / int4_g128 / int4_g128:awq)"
    ]


def test_path_selection(stories):
    assert fast_path_reason(stories.model) is None
    assert isinstance(make_decoder(stories.model, 64, "eager"), FastDecoder)
    assert isinstance(make_decoder(stories.model, 64, "eager", path="hf"), StaticDecoder)
    with pytest.raises(WorkbenchError, match="decode path 'turbo'"):
        make_decoder(stories.model, 64, "eager", path="turbo")
    with pytest.raises(WorkbenchError, match="needs the model on CUDA"):
        make_decoder(stories.model, 64, "graph")
    ids = stories.tokenizer.encode("Once upon a time", add_bos=True)
    assert greedy_generate(stories.model, ids, 20).path == "fast"


def test_unsupported_model_falls_back_to_hf_with_a_note():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).eval()
    assert fast_path_reason(model) == "model type 'gpt2' (fast path: llama, mistral, qwen2)"
    dec = make_decoder(model, 32, "eager")
    assert isinstance(dec, StaticDecoder) and dec.notes == [
        "fast path not used: model type 'gpt2' (fast path: llama, mistral, qwen2)"
    ]
    with pytest.raises(WorkbenchError, match="fast decode path cannot run this model: model type 'gpt2'"):
        make_decoder(model, 32, "eager", path="fast")


def test_generate_command_uses_the_fast_path(capsys):
    import json

    from tests.conftest import STORIES
    from workbench.cli import main

    if not STORIES.is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    out = {}
    for path in ("auto", "hf"):
        argv = ["generate", "--model", str(STORIES), "--prompt", "Once upon a time", "--max-new-tokens", "12"]
        assert main(argv + ["--path", path, "--json"]) == 0
        out[path] = json.loads(capsys.readouterr().out)
    assert out["auto"]["result"]["path"] == "fast" and out["hf"]["result"]["path"] == "hf"
    assert out["auto"]["text"] == out["hf"]["text"]
    assert out["auto"]["result"]["decode_tokens_per_s"] > 0
