"""Activation specs (workbench.quant.act): grammar, hand-computed quantize-dequantize values, and the hooks
that simulate them in a forward pass (workbench.measure.simulate.act_quantized)."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.measure.simulate import act_quantized
from workbench.quant.act import ActSpec, fake_quant_act, parse_act

X = torch.tensor([[-0.9, 0.6, 2.0, 0.25]])
S = 2.9 / 15  # asym int4 scale: (max - min) / 15


@pytest.mark.parametrize(
    "spec, want",
    [
        # sym int4: scale = 2/7; x/scale = -3.15, 2.1, 7, 0.875 -> codes -3, 2, 7, 1
        ("int4_tok_sym", [-6 / 7, 4 / 7, 2.0, 2 / 7]),
        # asym int4: scale S = 2.9/15, zero = round(0.9/S = 4.66) = 5; x/S = -4.66, 3.10, 10.34, 1.29
        ("int4_tok", [-5 * S, 3 * S, 10 * S, S]),
        # clip 0.5: scale = 1/7; x/scale = -6.3, 4.2, 14 -> saturates at 7, 1.75 -> codes -6, 4, 7, 2
        ("int4_tok_sym_clip0.5", [-6 / 7, 4 / 7, 1.0, 2 / 7]),
        # fp8 E4M3: absmax 2 -> 448 (scale 1/224); -201.6 -> -208 and 134.4 -> 128 (spacing 16 in
        # [128, 256)), 448 and 56 exact
        ("fp8_e4m3_tok", [-208 / 224, 128 / 224, 2.0, 0.25]),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_hand_computed_values(spec, want):
    torch.testing.assert_close(fake_quant_act(X, spec), torch.tensor([want]), rtol=0, atol=1e-6)


def test_fp8_rounds_to_the_nearest_e4m3_value():
    # absmax 4 -> 448 (scale 1/112); 1.1 * 112 = 123.2 lies between E4M3 values 120 and 128 -> 120
    y = fake_quant_act(torch.tensor([[4.0, 1.1]]), "fp8_e4m3_tok")
    torch.testing.assert_close(y, torch.tensor([[4.0, 120 / 112]]), rtol=0, atol=1e-6)


def test_int8_per_token_and_per_group():
    x = torch.cat([torch.ones(8), torch.full((8,), 100.0)])[None]  # [1, 16]
    # per token: scale 100/127, 1 -> code 1 -> 100/127; per group of 8: each group exact
    torch.testing.assert_close(fake_quant_act(x, "int8_tok_sym")[0, 0], torch.tensor(100 / 127))
    torch.testing.assert_close(fake_quant_act(x, "int8_g8_sym"), x, rtol=0, atol=1e-6)
    # every token (row) has its own scale: a large token does not coarsen a small one
    rows = torch.stack([torch.linspace(-1, 1, 16), 1000 * torch.linspace(-1, 1, 16)])
    y = fake_quant_act(rows, "int8_tok_sym")
    assert float((y[0] - rows[0]).abs().max()) <= 0.5 / 127 + 1e-7


def test_error_shrinks_with_bits_and_dtype_is_kept():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    errs = [float((fake_quant_act(x, f"int{b}_tok") - x).float().pow(2).mean()) for b in (4, 6, 8)]
    assert errs[0] > errs[1] > errs[2] > 0
    assert fake_quant_act(x, "int8_tok").dtype == torch.bfloat16


def test_grammar_round_trip_and_refusals():
    for s in ["int8_tok", "int8_tok_sym", "fp8_e4m3_tok", "int4_g128", "int4_tok_clip0.9", "int4_g128_sym"]:
        assert str(ActSpec.parse(s)) == s
    assert str(ActSpec.parse("int8_tok_asym")) == "int8_tok"
    assert parse_act("none") is None and parse_act(None) is None
    with pytest.raises(WorkbenchError, match="unknown activation spec 'int9_tok'"):
        ActSpec.parse("int9_tok")
    with pytest.raises(WorkbenchError, match="clip ratio must be in"):
        ActSpec.parse("int8_tok_clip1.5")
    with pytest.raises(WorkbenchError, match="symmetric only"):
        ActSpec.parse("fp8_e4m3_tok_asym")
    assert "does not divide the layer's 172" in ActSpec.parse("int4_g128").check_layer(172)
    with pytest.raises(WorkbenchError, match="does not divide"):
        fake_quant_act(torch.zeros(2, 172), "int4_g128")


def test_hooks_quantize_inputs_and_are_removed(stories):
    model = stories.model
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        base = model(input_ids=ids).logits
        seen = {}
        name = "model.layers.0.mlp.down_proj"
        with act_quantized(model, {name: "int4_tok_sym"}):
            # a hook added later runs after the quantizing one: it sees what the matmul sees
            h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
            q = model(input_ids=ids).logits
            h.remove()
        again = model(input_ids=ids).logits
    assert float((q - base).abs().max()) > 1e-3  # the input really was quantized
    assert torch.equal(again, base)  # and the hook is gone
    # the layer saw exactly the fake-quantized input: at most 16 distinct levels per token (4 bits)
    assert all(len(torch.unique(row)) <= 16 for row in seen["x"][0])
