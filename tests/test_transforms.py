"""Transforms (plan version 2): Hadamard matrices, computational invariance of every transform on stories260K,
invertibility, refusals, and plan JSON v1/v2."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.plan.plan import Plan, Rule
from workbench.plan.transforms import Hadamard, Smooth, parse_transforms
from workbench.quant.hadamard import hadamard, hadamard_construction, random_hadamard
from workbench.transform.apply import apply_transforms
from workbench.transform.rotate import check_llama, max_logit_change, rotate_residual

IDS = torch.randint(1, 512, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n", [4, 12, 64, 172, 576, 1536])
def test_hadamard_matrices_and_rotations_are_orthogonal(n):
    H = hadamard(n)
    b = n if "block" not in hadamard_construction(n) else 4  # 172: 43 blocks of 4
    assert set(H.unique().tolist()) == ({-1.0, 1.0} if b == n else {-1.0, 0.0, 1.0})
    torch.testing.assert_close(H @ H.T, b * torch.eye(n, dtype=torch.float64), rtol=0, atol=0)
    Q = random_hadamard(n, seed=3)
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert n < 12 or not torch.equal(Q, random_hadamard(n, seed=4))  # the seed draws the signs


def test_constructions_of_the_model_widths():
    assert hadamard_construction(576) == "paley 12 ⊗ paley 12 ⊗ sylvester 4"
    assert hadamard_construction(1536) == "paley 12 ⊗ sylvester 128"
    assert hadamard_construction(172) == "block-diagonal 43 x (sylvester 4)"


@pytest.mark.parametrize(
    "transforms",
    [
        [{"kind": "hadamard", "where": "residual", "seed": 0}],
        [{"kind": "hadamard", "where": "down", "seed": 1}],
        [{"kind": "smooth", "match": "re:.*", "alpha": 0.5, "calib_seqs": 2, "calib": "tinystories"}],
        [
            {"kind": "hadamard", "where": "residual"},
            {"kind": "smooth", "match": "role:o", "alpha": 0.8, "calib_seqs": 2, "calib": "tinystories"},
            {"kind": "hadamard", "where": "down"},
        ],
    ],
    ids=["residual", "down", "smooth-all", "residual+smooth-o+down"],
)
def test_transformed_fp32_model_gives_the_same_logits(stories, transforms):
    before = {k: v.clone() for k, v in stories.model.state_dict().items()}
    t = apply_transforms(stories, parse_transforms(transforms))
    # logits of stories260K reach |16|; fp32 rounding of the rotated weights moves them by ~2e-5
    assert max_logit_change(stories.model, t.model, IDS) < 2e-4
    after = stories.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original is untouched
    assert t.description.fingerprint != stories.description.fingerprint
    changed = [k for k, v in t.model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed  # and the copy really changed


def test_rotation_is_invertible(stories):
    fused = copy.deepcopy(stories.model)
    rotate_residual(fused, torch.eye(64, dtype=torch.float64))  # norms fused, no rotation
    back = copy.deepcopy(stories.model)
    Q = random_hadamard(64, seed=7)
    rotate_residual(back, Q)
    rotated = {k: v.clone() for k, v in back.state_dict().items()}
    rotate_residual(back, Q.T)
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    assert not torch.allclose(rotated["model.layers.0.self_attn.q_proj.weight"], v.new_zeros(1) + 0)


def test_rotation_spreads_the_outlier_channel(stories):
    t = apply_transforms(stories, [Hadamard("residual", 0)])
    E, Et = stories.model.model.embed_tokens.weight, t.model.model.embed_tokens.weight
    ratio = lambda W: float(W.detach().abs().amax(0).max() / W.detach().abs().amax(0).median())  # noqa: E731
    assert ratio(Et) < ratio(E)


def test_smooth_moves_the_input_range_into_the_weights(stories):
    from workbench.transform.smooth import smooth

    model = copy.deepcopy(stories.model)
    s = smooth(model, stories, Smooth("role:down", 1.0, 2, "tinystories"))
    name = "model.layers.1.mlp.down_proj"
    W0 = stories.model.get_submodule(name).weight
    W1 = model.get_submodule(name).weight
    torch.testing.assert_close(W1, W0 * s[name].float()[None, :])
    assert max_logit_change(stories.model, model, IDS) < 2e-4


def test_unsupported_architectures_are_refused_naming_the_layer(stories):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(WorkbenchError, match="layer transformer.h.0.attn.c_attn is a GPT-2 Conv1D"):
        check_llama(gpt2, "hadamard (residual)")
    model = copy.deepcopy(stories.model)
    model.model.layers[2].post_attention_layernorm = torch.nn.LayerNorm(64)
    with pytest.raises(WorkbenchError, match="model.layers.2.post_attention_layernorm .*not an RMSNorm"):
        rotate_residual(model, random_hadamard(64))
    ln = torch.nn.LayerNorm(64, bias=False)
    model.model.layers[2].post_attention_layernorm = ln
    with pytest.raises(WorkbenchError, match="model.layers.2.post_attention_layernorm .*x / rms"):
        rotate_residual(model, random_hadamard(64))


def test_smooth_refuses_a_rotated_down_input(stories):
    from workbench.transform.smooth import smooth

    t = apply_transforms(stories, [Hadamard("down", 0)])
    with pytest.raises(WorkbenchError, match="layer model.layers.0.mlp.down_proj has an online Hadamard"):
        smooth(t.model, stories, Smooth("role:down", 0.5, 1, "tinystories"))


def test_plan_json_v1_and_v2(stories, tmp_path):
    v1 = Plan(default="int4_g32", rules=[Rule("lm_head", "bf16")])
    assert v1.to_json()["version"] == 1 and Plan.from_json(v1.to_json()) == v1
    v2 = Plan(
        default="int4_g32",
        act="int8_tok",
        rules=[Rule("lm_head", "bf16", "none"), Rule("role:down", act="int4_tok_sym_clip0.9")],
        transforms=parse_transforms(
            [{"kind": "hadamard"}, {"kind": "smooth", "match": "role:q", "alpha": 0.5}]
        ),
    )
    path = tmp_path / "v2.json"
    v2.save(path)
    d = json.loads(path.read_text())
    assert d["version"] == 2 and d["transforms"][0] == {"kind": "hadamard", "where": "residual", "seed": 0}
    assert Plan.load(path) == v2
    r = v2.resolve(stories.model)
    assert "lm_head" not in r.acts and str(r.acts["model.layers.0.mlp.down_proj"]) == "int4_tok_sym_clip0.9"
    assert str(r.acts["model.layers.0.self_attn.q_proj"]) == "int8_tok" and len(r.transforms) == 2


def test_plan_v2_refusals(stories):
    base = {"format": "workbench.plan", "version": 2, "default": "bf16"}
    with pytest.raises(WorkbenchError, match="transform kind 'spinquant' cannot be run by this workbench"):
        Plan.from_json({**base, "transforms": [{"kind": "spinquant"}]})
    with pytest.raises(WorkbenchError, match="alpha must be in \\[0, 1\\], got 1.5"):
        Plan.from_json({**base, "transforms": [{"kind": "smooth", "match": "role:down", "alpha": 1.5}]})
    with pytest.raises(WorkbenchError, match="'where' must be one of residual, down"):
        Plan.from_json({**base, "transforms": [{"kind": "hadamard", "where": "everywhere"}]})
    with pytest.raises(WorkbenchError, match="unknown plan key.*'kv'"):
        Plan.from_json({**base, "kv": "int8"})
    with pytest.raises(WorkbenchError, match="rule 1 must be"):  # v1 rules carry no act
        Plan.from_json(
            {**base, "version": 1, "rules": [{"match": "lm_head", "spec": "bf16", "act": "int8_tok"}]}
        )
    with pytest.raises(WorkbenchError, match="unknown plan key\\(s\\) 'transforms'"):
        Plan.from_json({**base, "version": 1, "transforms": []})
    bad = Plan(act="int4_g128", rules=[Rule("re:nothing", act="int8_tok")])
    with pytest.raises(WorkbenchError) as exc:
        bad.resolve(stories.model)
    msg = str(exc.value)
    assert (
        "layer model.layers.0.mlp.down_proj: act int4_g128 (default act) cannot apply: group size 128" in msg
    )
    assert "rule 1 (match 're:nothing') matches no layer" in msg


def test_evaluate_runs_transforms_and_act_specs(stories):
    from workbench.measure.evaluate import evaluate

    kw = dict(text="tinystories", seq_len=128, max_tokens=2048, progress=False)
    fp32 = Plan(default="bf16")
    rot = [Hadamard("residual", 0), Hadamard("down", 0)]
    plain, rotated = (evaluate(stories, p.resolve(stories.model), **kw) for p in (fp32, Plan(transforms=rot)))
    assert abs(rotated.kl - plain.kl) < 0.5 * plain.kl + 1e-6  # only the bf16 rounding of the weights
    a8 = evaluate(stories, Plan(act="int8_tok_sym").resolve(stories.model), **kw)
    a4 = evaluate(stories, Plan(act="int4_tok_sym").resolve(stories.model), **kw)
    assert plain.kl < a8.kl < a4.kl  # the act specs really run, and 4 bits hurt more than 8


def test_outlier_stats_match_a_direct_computation_and_drop_after_rotation(stories):
    from workbench.stats.outliers import input_outliers

    name = "model.layers.1.mlp.down_proj"
    batches = IDS[:, :32]
    seen = []
    h = stories.model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    st = input_outliers(stories.model, [name], batches)[name]
    h.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    k = float(((x - x.mean()) ** 4).mean() / x.var(unbiased=False) ** 2)
    ch = x.abs().amax(0)
    assert st.kurtosis == pytest.approx(k, rel=1e-6)
    assert st.max_median == pytest.approx(float(ch.max() / ch.median()), rel=1e-9)
    assert st.n_values == x.numel()
    rotated = apply_transforms(stories, [Hadamard("residual", 0), Hadamard("down", 0)])
    after = input_outliers(rotated.model, [name], batches)[name]
    assert after.kurtosis < st.kurtosis and after.max_median < st.max_median


def test_apply_plan_refuses_untransformed_models_and_simulates_act_specs(stories):
    from workbench.runtime.apply import apply_plan

    plan = Plan(default="int8_ch_sym", act="int8_tok_sym", rules=[Rule("lm_head", "bf16", "none")])
    rot = Plan(default="int8_ch_sym", transforms=[Hadamard("residual", 0)])
    with pytest.raises(
        WorkbenchError, match="transforms \\(hadamard:residual\\) were not applied to this model"
    ):
        apply_plan(copy.deepcopy(stories.model), rot.resolve(stories.model), backend="reference")
    t = apply_transforms(stories, rot.transforms)
    report = apply_plan(t.model, rot.resolve(t.model), backend="reference")
    assert len(report.layers) == 36 and not report.act_simulated
    weights_only = copy.deepcopy(stories.model)
    apply_plan(weights_only, Plan(default="int8_ch_sym").resolve(stories.model), backend="reference")
    model = copy.deepcopy(stories.model)
    with pytest.warns(UserWarning, match="activation specs without a W8A8 kernel: 35 layers"):
        report = apply_plan(model, plan.resolve(stories.model), backend="reference")
    assert report.act_simulated["model.layers.0.mlp.down_proj"] == "int8_tok_sym"
    with torch.no_grad():
        d_act = (model(input_ids=IDS).logits - weights_only(input_ids=IDS).logits).abs().max()
        d_rot = (t.model(input_ids=IDS).logits - stories.model(input_ids=IDS).logits).abs().max()
    assert float(d_act) > 1e-3  # the hooks quantize the inputs of the packed layers
    assert float(d_rot) < 1.0  # the rotated int8 model still computes the same function, roughly


def test_packed_rotated_model_keeps_its_online_hadamard_and_reloads_to_the_same_logits(stories, tmp_path):
    from workbench.runtime.apply import apply_plan
    from workbench.runtime.serialize import load_quantized, save_quantized

    plan = Plan(default="int8_ch_sym", transforms=[Hadamard("residual", 0), Hadamard("down", 0)])
    plain = copy.deepcopy(stories.model)
    apply_plan(plain, Plan(default="int8_ch_sym").resolve(plain), backend="reference", warn=False)
    t = apply_transforms(stories, plan.transforms)
    apply_plan(t.model, plan.resolve(t.model), backend="reference", warn=False)
    assert hasattr(t.model.model.layers[0].mlp.down_proj, "online_hadamard")  # carried onto the QuantLinear
    with torch.no_grad():
        ref = stories.model(input_ids=IDS).logits
        d_rot = float((t.model(input_ids=IDS).logits - ref).abs().max())
        d_plain = float((plain(input_ids=IDS).logits - ref).abs().max())
    assert d_rot < 2 * d_plain + 0.05, (d_rot, d_plain)  # int8 error only (without the x H: ~28)
    save_quantized(t.model, plan, tmp_path / "q", tokenizer=stories.tokenizer)
    model, back = load_quantized(tmp_path / "q")
    assert back.transforms == plan.transforms and model.workbench_transforms == tuple(plan.transforms)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, t.model(input_ids=IDS).logits)
