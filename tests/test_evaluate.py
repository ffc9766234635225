"""Evaluation and simulation on stories260K: PPL/KL/top-1 against direct computation, weight restoration,
the tied head, and the on-disk reference cache."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.measure.evaluate import evaluate
from workbench.measure.simulate import fake_quantized
from workbench.model.data import eval_windows
from workbench.model.inventory import layer_inventory
from workbench.plan.plan import Plan, Rule

from .conftest import DATA


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text((DATA / "calibration" / "tinystories.txt").read_text()[:6000])
    return str(path)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _direct(model, windows, resolved=None):
    """Reference and quantized log-probs computed the plain way: two full forwards."""
    with torch.no_grad():
        ref = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
        if resolved is None:
            return ref, ref
        with fake_quantized(model, resolved):
            q = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
    return ref, q


def test_reference_perplexity_matches_hf_loss(stories, text):
    res = evaluate(stories, None, text=text, seq_len=128, max_tokens=1024, progress=False)
    windows = eval_windows(stories.tokenizer, text, 128, 1024)
    with torch.no_grad():
        loss = stories.model(windows, labels=windows).loss  # mean NLL over all predicted tokens
    assert res.n_tokens == windows.shape[0] * 127 and res.kl == 0.0 and res.top1 == 1.0
    assert res.ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_kl_top1_ppl_match_direct_computation(stories, text):
    layers = layer_inventory(stories.model)
    resolved = Plan(default="int4_g32", rules=[Rule("role:down", "int3_g32")]).resolve(layers)
    res = evaluate(stories, resolved, text=text, seq_len=128, max_tokens=1024, progress=False)
    windows = eval_windows(stories.tokenizer, text, 128, 1024)
    ref, q = _direct(stories.model, windows, resolved)
    kl = float((ref.exp() * (ref - q)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == q.argmax(-1)).float().mean())
    nll = float(-q.gather(-1, windows[:, 1:, None]).mean())
    assert res.kl == pytest.approx(kl, rel=1e-4) and res.kl > 0.01
    assert res.top1 == pytest.approx(top1, abs=1e-6) and res.top1 < 1.0
    assert res.ppl == pytest.approx(math.exp(nll), rel=1e-5) and res.ppl > res.ref_ppl


def test_quality_orders_with_bits(stories, text):
    layers = layer_inventory(stories.model)
    r = {
        s: evaluate(
            stories, Plan(default=s).resolve(layers), text=text, seq_len=128, max_tokens=1024, progress=False
        )
        for s in ("int8_ch", "int4_g32", "int2_g32")
    }
    assert 0 < r["int8_ch"].kl < r["int4_g32"].kl < r["int2_g32"].kl
    assert r["int8_ch"].top1 > r["int4_g32"].top1 > r["int2_g32"].top1


def test_weights_restored_and_tied_head_untied(stories):
    model = stories.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is emb
    with fake_quantized(model, {"lm_head": "int2_g32", "model.layers.0.mlp.up_proj": "int3_g32"}):
        assert model.lm_head.weight is not emb  # head swapped, embeddings untouched
        assert torch.equal(model.get_input_embeddings().weight, before["model.embed_tokens.weight"])
        assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])
    with pytest.raises(RuntimeError, match="boom"):
        with fake_quantized(model, {"model.layers.1.self_attn.q_proj": "int2_g32"}):
            raise RuntimeError("boom")
    assert model.lm_head.weight is emb
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    with pytest.raises(WorkbenchError, match="needs calibration statistics"):
        with fake_quantized(model, {"model.layers.1.self_attn.q_proj": "int4_g32:gptq"}):
            pass


def test_reference_cache_is_used(stories, text, monkeypatch):
    import workbench.measure.evaluate as ev

    evaluate(stories, None, text=text, seq_len=64, max_tokens=512, progress=False)  # fills the cache

    def fail(*a, **k):
        raise AssertionError("reference recomputed despite the cache")

    monkeypatch.setattr(ev, "compute_reference", fail)
    layers = layer_inventory(stories.model)
    res = evaluate(
        stories,
        Plan(default="int8_ch").resolve(layers),
        text=text,
        seq_len=64,
        max_tokens=512,
        progress=False,
    )
    assert 0 < res.kl < 0.01
