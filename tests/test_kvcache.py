"""KV-cache specs, quantizers, plan keys, the simulated cache vs the runtime store (issue 17)."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.measure.kvsim import kv_attention, kv_quantized, quantize_keys, read_mask
from workbench.plan.kv import KVLayerSpec, check_context, kv_cache_bytes
from workbench.plan.plan import Plan, ResolvedPlan, Rule
from workbench.quant.kvcache import KVSpec, fake_quant_kv, hadamard_matrix
from workbench.runtime.kvcache import QuantKVSide, pack_kv_codes, unpack_kv_codes


def test_parse_round_trip_and_defaults():
    for s in [
        "int4_ch_r32",
        "int4_tok_r32",
        "int8_tok",
        "fp8_e4m3_tok",
        "int4_ch_g64_had_pre",
        "int2_tok_g16_sym",
    ]:
        assert str(KVSpec.parse(s)) == s
    spec = KVSpec.parse("int4_ch_r32")
    assert (spec.bits, spec.axis, spec.residual, spec.group(64), spec.sym) == (4, "ch", 32, 32, False)
    assert KVSpec.parse("int8_tok").group(64) == 64
    assert str(KVSpec.parse("fp8_e4m3_tok_sym")) == "fp8_e4m3_tok"  # fp8 is symmetric only
    with pytest.raises(WorkbenchError, match="unknown KV-cache spec 'int4_row'"):
        KVSpec.parse("int4_row")


def test_bad_head_dim_group_and_side():
    assert "does not divide the head dimension 64" in KVSpec.parse("int4_tok_g48").check(64, "k")
    assert "keys only" in KVSpec.parse("int4_tok_had").check(64, "v")
    assert "power-of-two" in KVSpec.parse("int4_ch_had").check(96, "k")
    assert KVSpec.parse("int4_ch_g48").check(64, "k") is None  # a token group along the sequence


def test_int_quantizers_hand_computed():
    # int2 asym per token, head_dim 4: min 0, max 3 -> scale 1, codes 0..3, exact
    x = torch.tensor([[[[0.0, 0.9, 2.2, 3.0]]]])
    assert torch.equal(fake_quant_kv(x, "int2_tok"), torch.tensor([[[[0.0, 1.0, 2.0, 3.0]]]]))
    # int4 sym: absmax 7 -> scale 1, 0.4 -> 0, 3.6 -> 4
    x = torch.tensor([[[[-7.0, 0.4, 3.6, 7.0]]]])
    assert torch.equal(fake_quant_kv(x, "int4_tok_sym"), torch.tensor([[[[-7.0, 0.0, 4.0, 7.0]]]]))
    # int2 per channel in groups of 3 tokens: channel 0 = [0, 1.2, 3] -> [0, 1, 3];
    # channel 1 = [10, 10, 16]: min 10, scale 2 -> [10, 10, 16]
    x = torch.tensor([[0.0, 10.0], [1.2, 10.0], [3.0, 16.0]])[None, None]
    want = torch.tensor([[0.0, 10.0], [1.0, 10.0], [3.0, 16.0]])[None, None]
    assert torch.equal(fake_quant_kv(x, "int2_ch_g3"), want)
    # fp8: absmax 448 -> scale 1; 3.3 is between E4M3 neighbours 3.25 and 3.5
    x = torch.tensor([[[[448.0, 3.3]]]])
    assert torch.equal(fake_quant_kv(x, "fp8_e4m3_tok"), torch.tensor([[[[448.0, 3.25]]]]))


def test_quantized_prefix_and_bytes():
    ch, tok = KVSpec.parse("int4_ch_r32"), KVSpec.parse("int4_tok_r32")
    assert [ch.quantized_prefix(n, 64) for n in (31, 63, 64, 95, 96)] == [0, 0, 32, 32, 64]
    assert [tok.quantized_prefix(n, 64) for n in (32, 40)] == [0, 8]
    assert KVSpec.parse("int2_ch").quantized_prefix(70, 64) == 64  # R = 0 keeps the incomplete group
    # 2,048 tokens, head_dim 64: ch: 2,016 quantized tokens -> codes 64,512 B, 63 x 64 (scale, min) fp16
    # 16,128 B, 32 bf16 tokens 4,096 B; tok: codes 64,512, 2,016 (scale, min) 8,064, window 4,096
    assert ch.cache_bytes(2048, 64) == 64512 + 16128 + 4096
    assert tok.cache_bytes(2048, 64) == 64512 + 8064 + 4096
    assert KVSpec.parse("int8_tok_sym").cache_bytes(10, 64, 3) == 3 * 10 * (64 + 2)
    kv = Plan(k="int4_ch_r32", v="int4_tok_r32").resolve(_llama_layers()).kv
    blocks = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert kv_cache_bytes(kv, blocks, 2048, 64, 3) == 2 * 3 * (84736 + 76672)


def _llama_layers():
    from workbench.model.inventory import LayerInfo

    out = []
    for b in range(2):
        for role, proj in [("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj")]:
            out.append(LayerInfo(f"model.layers.{b}.{proj}", b, role, 64, 64, 64 * 64, False, "linear"))
    return out


def test_plan_keys_round_trip_and_rules():
    plan = Plan(
        default="int4_g128",
        k="int4_ch_r32",
        v="int4_tok_r32",
        rules=[Rule("re:model\\.layers\\.1\\..*", k="int8_ch", v="none"), Rule("lm_head", spec="bf16")],
    )
    d = plan.to_json()
    assert (
        d["version"] == 2
        and d["k"] == "int4_ch_r32"
        and d["rules"][0]
        == {
            "match": "re:model\\.layers\\.1\\..*",
            "k": "int8_ch",
            "v": "none",
        }
    )
    assert Plan.from_json(d).to_json() == d
    kv = Plan.from_json(d).resolve(_llama_layers() + [_head()]).kv
    assert {n: s.to_json() for n, s in kv.items()} == {
        "model.layers.0.self_attn": {"k": "int4_ch_r32", "v": "int4_tok_r32"},
        "model.layers.1.self_attn": {"k": "int8_ch", "v": "none"},
    }
    bad = Plan(k="int4_tok_had", v="int4_tok_had", rules=[Rule("lm_head", k="int4_ch")])
    with pytest.raises(WorkbenchError) as e:
        bad.resolve(_llama_layers() + [_head()])
    assert "rule 1 (match 'lm_head') sets a KV-cache spec but matches no layer of an attention block" in str(
        e.value
    )
    with pytest.raises(WorkbenchError, match="unknown KV-cache spec 'int4'"):
        Plan(k="int4").resolve(_llama_layers())


def _head():
    from workbench.model.inventory import LayerInfo

    return LayerInfo("lm_head", None, "lm_head", 64, 64, 64 * 64, False, "linear")


def test_head_dim_checked_against_the_model_and_context(stories):
    with pytest.raises(
        WorkbenchError, match="layers.0.self_attn: k cache spec int4_tok_g16 cannot apply: group size"
    ):
        Plan(k="int4_tok_g16").resolve(stories.model)  # stories260K: head_dim 8
    kv = Plan(k="int4_ch_r64").resolve(stories.model).kv
    with pytest.raises(
        WorkbenchError, match="residual window of 64 tokens, not shorter than the context of 64"
    ):
        check_context(kv, 64)


def test_pack_round_trip():
    for bits in (2, 4, 8):
        c = torch.randint(0, 2**bits, (3, 5, 16), dtype=torch.uint8)
        p = pack_kv_codes(c, bits)
        assert p.shape[-1] == 16 * bits // 8 and torch.equal(unpack_kv_codes(p, bits), c)
    assert pack_kv_codes(torch.tensor([[1, 2]], dtype=torch.uint8), 4).item() == 0x21


@pytest.mark.parametrize(
    "spec", ["int4_ch_g4_r3", "int2_ch_g8", "int8_tok_r5", "int4_tok_g4_sym", "fp8_e4m3_tok"]
)
def test_store_written_token_by_token_equals_simulation(spec):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 29, 8) * torch.linspace(0.2, 5, 8)  # outlier channels
    side = QuantKVSide(spec, 2, 3, 8, capacity=32)
    s = KVSpec.parse(spec)
    sim = fake_quant_kv(x, s)
    for t in range(29):
        side.append(x[:, :, t : t + 1])
        q = s.quantized_prefix(t + 1, 8)
        assert side.n_quantized == q
        read = side.dequantized()
        assert torch.equal(read[:, :, :q], sim[:, :, :q])  # the codes: bit-exact with the simulation
        assert torch.equal(read[:, :, q:], x[:, :, q : t + 1])  # the window: as written
        assert torch.equal(read_mask(s, t + 1, 8)[t], torch.arange(t + 1) < q)
    assert side.nbytes() == s.cache_bytes(29, 8, 6)


def test_attention_equals_incremental_decode(stories):
    """Teacher-forced simulated attention == a decoder writing one token at a time into QuantKVSide."""
    torch.manual_seed(0)
    model = stories.model
    attn = model.model.layers[1].self_attn
    T, D = 40, attn.head_dim
    h = torch.randn(1, T, model.config.hidden_size)
    pos = torch.arange(T)[None]
    cos, sin = model.model.rotary_emb(h, pos)
    kv = Plan(k="int4_ch_g8_r4", v="int4_tok_r4").resolve(model).kv["model.layers.1.self_attn"]
    out, _ = kv_attention(attn, kv, h, (cos, sin))
    kside = QuantKVSide(kv.k, 1, model.config.num_key_value_heads, D, 48)
    vside = QuantKVSide(kv.v, 1, model.config.num_key_value_heads, D, 48)
    rep = attn.num_key_value_groups
    for t in range(T):
        ht = h[:, t : t + 1]
        q = attn.q_proj(ht).view(1, 1, -1, D).transpose(1, 2)
        k = attn.k_proj(ht).view(1, 1, -1, D).transpose(1, 2)
        v = attn.v_proj(ht).view(1, 1, -1, D).transpose(1, 2)
        c, s_ = cos[:, t : t + 1, None].transpose(1, 2), sin[:, t : t + 1, None].transpose(1, 2)
        rot = lambda x: x * c + torch.cat((-x[..., D // 2 :], x[..., : D // 2]), -1) * s_  # noqa: E731
        kside.append(rot(k))
        vside.append(v)
        K = kside.dequantized().repeat_interleave(rep, 1)
        V = vside.dequantized().repeat_interleave(rep, 1)
        p = torch.softmax(rot(q) @ K.transpose(-1, -2) * attn.scaling, -1)
        o = attn.o_proj((p @ V).transpose(1, 2).reshape(1, 1, -1))
        torch.testing.assert_close(o[0, 0], out[0, t], atol=2e-5, rtol=1e-4)


def test_hadamard_and_pre_rope_keys():
    torch.manual_seed(0)
    H = hadamard_matrix(8)
    torch.testing.assert_close(H @ H.T, torch.eye(8), atol=1e-6, rtol=0)
    k = torch.randn(1, 2, 16, 8)
    ones, zeros = torch.ones(1, 16, 8), torch.zeros(1, 16, 8)  # cos = 1, sin = 0: RoPE is the identity
    plain = quantize_keys(k, KVSpec.parse("int4_tok"), ones, zeros)
    assert torch.equal(plain, fake_quant_kv(k, "int4_tok"))
    assert torch.equal(quantize_keys(k, KVSpec.parse("int4_tok_pre"), ones, zeros), plain)
    had = quantize_keys(k, KVSpec.parse("int4_tok_had"), ones, zeros)
    torch.testing.assert_close(had, fake_quant_kv(k @ H, "int4_tok") @ H.T)
    # an outlier channel: the rotation spreads it, so the per-token error drops
    k[..., 3] *= 30
    err = lambda s: float((quantize_keys(k, KVSpec.parse(s), ones, zeros) - k).pow(2).mean())  # noqa: E731
    assert err("int4_tok_had") < 0.8 * err("int4_tok")  # measured 0.134 vs 0.209


def test_simulation_on_stories_orders_bits_and_restores(stories):
    """KL of K8V8 < K4V4 < K2V2 on real text; R = 32 beats R = 0; the model is unchanged afterwards."""
    from workbench.measure.evaluate import evaluate

    model = stories.model
    ids = torch.randint(0, 500, (1, 32))
    before = model(input_ids=ids, use_cache=False).logits
    kls = {}
    for k, v in [
        ("int8_ch", "int8_tok"),
        ("int4_ch", "int4_tok"),
        ("int2_ch", "int2_tok"),
        ("int2_ch_r32", "int2_tok_r32"),
    ]:
        kv = Plan(k=k, v=v).resolve(model).kv
        r = evaluate(stories, ResolvedPlan({}, [], kv=kv), seq_len=128, max_tokens=2048, progress=False)
        kls[k] = r.kl
    assert kls["int8_ch"] < 1e-3 < kls["int4_ch"] < kls["int2_ch"]
    assert kls["int2_ch_r32"] < 0.8 * kls["int2_ch"]
    assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)
    with kv_quantized(model, Plan(k="int8_ch").resolve(model).kv):
        assert not torch.equal(
            model(input_ids=torch.randint(0, 500, (1, 64)), use_cache=False).logits, before
        )


def test_unpatchable_attention_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(
        WorkbenchError, match="layer transformer.h.0.attn: GPT2Attention attention cannot take"
    ):
        with kv_quantized(gpt2, {"transformer.h.0.attn": KVLayerSpec(KVSpec.parse("int8_ch"))}):
            pass


def test_kv_statistics_on_stories(stories, tmp_path, monkeypatch):
    from workbench.stats.kv import KVStats, kv_statistics

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    s = kv_statistics(stories, "wiki", n_seqs=2, seq_len=64)
    blocks = list(s.blocks)
    assert len(blocks) == 5 and set(s.blocks[blocks[0]]) == {"k_pre", "k_post", "v"}
    a = s.blocks[blocks[0]]["k_pre"]["absmax"]
    assert a.shape == (4, 8) and float(a.min()) > 0
    assert int(s.blocks[blocks[0]]["v"]["hist"].sum()) > 0
    # RoPE rotates channel pairs: the per-pair energy (rms^2 summed over the pair d, d + D/2) is kept
    pre, post = (s.blocks[blocks[2]][k]["rms"].pow(2) for k in ("k_pre", "k_post"))
    torch.testing.assert_close(pre[:, :4] + pre[:, 4:], post[:, :4] + post[:, 4:], rtol=1e-4, atol=1e-6)
    top = s.outliers("k_post", 5)
    assert len(top) == 5 and top[0]["ratio"] >= top[-1]["ratio"] >= 1.0
    s.save(tmp_path)
    back = KVStats.load(tmp_path)
    assert torch.equal(back.blocks[blocks[1]]["v"]["absmax"], s.blocks[blocks[1]]["v"]["absmax"])


def test_eval_cli_simulates_the_plan_cache(tmp_path, capsys):
    import json

    from workbench.cli import main
    from workbench.model.data import load_text

    from .conftest import STORIES

    plan = tmp_path / "kv.json"
    plan.write_text(
        json.dumps(
            {"format": "workbench.plan", "version": 2, "default": "bf16", "k": "int2_ch", "v": "int2_tok"}
        )
    )
    text = tmp_path / "stories_excerpt.txt"  # 1,024 tokens need ~5 k characters, not the 261 k of the text
    text.write_text(load_text("tinystories")[:20000])
    argv = ["eval", "--model", str(STORIES), "--plan", str(plan), "--tokens", "1024", "--seq-len", "128"]
    argv += ["--text", str(text)]
    assert main(argv + ["--quiet", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kv"]["model.layers.4.self_attn"] == {"k": "int2_ch", "v": "int2_tok"} and res["kl"] > 0.05
    plan.write_text(json.dumps({"format": "workbench.plan", "version": 2, "k": "int4_ch_r128"}))
    assert main(argv + ["--quiet"]) == 2  # a user mistake: one line, exit status 2
    assert "residual window of 128 tokens, not shorter than the context of 128" in capsys.readouterr().err
