"""Streaming (issue 18): stories260K saved as sharded safetensors, run block by block, equals the in-memory
paths (inspection statistics, proxy scan, quantization and its reload); the synthetic 70B-shaped source is
deterministic; a block that does not fit names itself and the bytes."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.presets import TINY_LLAMA
from workbench.streaming.skeleton import StreamedModel
from workbench.streaming.source import SafetensorsSource, SyntheticSource

SPECS = ["int4_g32", "int3_g32:gptq", "int8_ch"]


@pytest.fixture(scope="module")
def sharded(stories, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    stories.model.save_pretrained(str(folder), max_shard_size="300KB")
    return folder


@pytest.fixture(scope="module")
def ids(stories):
    from workbench.model.data import calibration_batches

    return calibration_batches(
        stories.tokenizer, "wiki", 4, 64, 0, max_context=stories.description.max_context
    )


def test_checkpoint_is_sharded_and_read_per_block(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    src = SafetensorsSource(sharded)
    state = src.block_state(2, torch.device("cpu"), torch.float32)
    assert set(state) == {
        k[len("model.layers.2.") :] for k in index["weight_map"] if k.startswith("model.layers.2.")
    }
    assert src.block_bytes(2, torch.float32) == sum(t.numel() * 4 for t in state.values())
    sm = StreamedModel(src)
    assert all(p.is_meta for p in sm.blocks.parameters())  # nothing of the blocks is resident
    assert not sm.model.model.embed_tokens.weight.is_meta


def test_stream_inspect_equals_in_memory(stories, sharded, ids):
    from workbench.stats.inspection import inspect_model
    from workbench.streaming.runs import stream_inspect

    ref = inspect_model(stories, "wiki", n_seqs=4, seq_len=64, cache=False, progress=False)
    got, report = stream_inspect(StreamedModel(SafetensorsSource(sharded)), ids, gram=True, progress=False)
    assert list(got.activations) == list(ref.activations)
    for name, a in ref.activations.items():
        b = got.activations[name]
        assert torch.equal(a.absmax, b.absmax) and torch.equal(a.hist_counts, b.hist_counts), name
        assert torch.equal(a.token_max.values, b.token_max.values), name
        assert b.shared_with == a.shared_with
        torch.testing.assert_close(b.gram, a.gram, rtol=1e-9, atol=1e-9)
        wa, wb = ref.weights[name], got.weights[name]
        assert wa.kurtosis == wb.kurtosis and torch.equal(wa.absmax_in, wb.absmax_in), name
    assert report.n_layers == len(ref.activations) and report.block_bytes > 0


def test_stream_scan_equals_in_memory_and_resumes(stories, sharded, ids, tmp_path):
    from workbench.measure.sensitivity import SensitivityTable, sensitivity_scan
    from workbench.streaming.runs import stream_proxy_scan

    ref = sensitivity_scan(
        stories, SPECS, "proxy", calibrate=False, calib_seqs=4, calib_seq_len=64, progress=False
    )
    out = tmp_path / "scan.json"
    sm = StreamedModel(SafetensorsSource(sharded))
    got, _ = stream_proxy_scan(sm, ids, SPECS, settings=ref.settings, out=out, progress=False)
    assert [x.name for x in got.layers] == [x.name for x in ref.layers]
    for name, row in ref.cost.items():
        for s in SPECS:
            assert got.cost[name][s] == pytest.approx(row[s], rel=1e-6), (name, s)
    assert got.cost["model.layers.0.self_attn.q_proj"]["int3_g32:gptq"] > 0
    # resume: a partial file keeps its costs and only the rest is scored
    saved = SensitivityTable.load(out)
    drop = [x.name for x in saved.layers if x.block == 3]
    for n in drop:
        del saved.cost[n]
    saved.cost["model.layers.0.mlp.up_proj"] = {s: -1.0 for s in SPECS}  # marks a kept (not rescored) row
    saved.save(out)
    again, report = stream_proxy_scan(sm, ids, SPECS, settings=ref.settings, out=out, progress=False)
    assert report.n_layers == len(drop)
    assert again.cost["model.layers.0.mlp.up_proj"]["int8_ch"] == -1.0
    assert again.cost[drop[0]] == pytest.approx(ref.cost[drop[0]], rel=1e-6)
    with pytest.raises(WorkbenchError, match="different scan"):
        stream_proxy_scan(sm, ids, SPECS[:2], settings=ref.settings, out=out, progress=False)


def test_stream_quantize_equals_in_memory_and_reloads(stories, sharded, ids, tmp_path):
    from workbench.measure.simulate import calibration_grams
    from workbench.model.inventory import layer_inventory
    from workbench.runtime.apply import apply_plan
    from workbench.runtime.serialize import load_quantized, save_quantized
    from workbench.streaming.quantize import stream_quantize

    names = [x.name for x in layer_inventory(stories.model)]
    plan = {n: ("int4_g32:gptq", "int8_ch", "int4_g32", "bf16")[i % 4] for i, n in enumerate(names)}
    gptq = [n for n, s in plan.items() if "gptq" in s]
    grams = calibration_grams(stories, gptq, "wiki", 4, 64, use_cache=False, progress=False)
    mem = copy.deepcopy(stories.model)
    apply_plan(mem, plan, grams, warn=False)
    save_quantized(mem, plan, tmp_path / "mem", tokenizer=stories.tokenizer)
    sm = StreamedModel(SafetensorsSource(sharded))
    folder, report = stream_quantize(
        sm, plan, tmp_path / "st", ids, tokenizer=stories.tokenizer, progress=False
    )
    assert report.extra["shards"] == sm.n_blocks
    assert len(list(folder.glob("blocks-*.safetensors"))) == sm.n_blocks
    a, _ = load_quantized(tmp_path / "mem")
    b, plan_b = load_quantized(folder)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    assert type(b.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    x = ids[:1]
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def test_synthetic_source_is_deterministic_and_shaped():
    a, b = SyntheticSource(TINY_LLAMA, seed=3), SyntheticSource(TINY_LLAMA, seed=3)
    cpu = torch.device("cpu")
    s0, s0b, s1 = (
        a.block_state(1, cpu, torch.float32),
        b.block_state(1, cpu, torch.float32),
        a.block_state(0, cpu, torch.float32),
    )
    assert all(torch.equal(s0[k], s0b[k]) for k in s0)
    assert not torch.equal(s0["mlp.up_proj.weight"], s1["mlp.up_proj.weight"])
    assert not torch.equal(
        s0["mlp.up_proj.weight"],
        SyntheticSource(TINY_LLAMA, seed=4).block_state(1, cpu, torch.float32)["mlp.up_proj.weight"],
    )
    W = s0["mlp.down_proj.weight"]
    assert W.shape == (256, 512) and 0.6 < float(W.std() * 512**0.5) < 1.6  # ~N(0, 1/K) plus tails
    norm = s0["input_layernorm.weight"]
    assert float(norm.max()) >= 8.0  # outlier channels
    assert float(norm.median()) == pytest.approx(1.0, abs=0.1)
    assert a.fingerprint() == b.fingerprint() != SyntheticSource(TINY_LLAMA, seed=4).fingerprint()
    big = SyntheticSource()  # the Llama-3-70B shape: 80 blocks of 7 linears (855,638,016 weights) + 2 norms
    assert big.n_blocks == 80 and big.block_bytes(0, torch.bfloat16) == 2 * (855_638_016 + 2 * 8192)


def test_synthetic_model_statistics_are_not_trivial():
    from workbench.streaming.runs import stream_inspect

    sm = StreamedModel(SyntheticSource(TINY_LLAMA, seed=0))
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    insp, _ = stream_inspect(sm, ids, progress=False)
    st = insp.activations["model.layers.1.mlp.gate_proj"]
    ratio = float(st.absmax.max() / st.absmax.median())
    assert ratio > 4.0  # the outlier channels of the norm weights show in the inputs
    assert len(insp.weights) == 2 * 7 + 1


def test_block_that_does_not_fit_names_itself(sharded):
    src = SafetensorsSource(sharded)
    need = src.block_bytes(0, torch.float32)
    sm = StreamedModel(src, memory_cap=need - 1)
    with pytest.raises(
        WorkbenchError, match=rf"decoder block 0 of .* needs {need:,} bytes, {need - 1:,} free"
    ):
        sm.load_block(0)
    StreamedModel(src, memory_cap=need).load_block(0)  # exactly enough fits


def test_bad_checkpoint_folders_are_named(tmp_path):
    with pytest.raises(WorkbenchError, match="no config.json"):
        SafetensorsSource(tmp_path)


def test_cli_stream_inspect_scan_quantize(stories, sharded, tmp_path, capsys):
    from workbench.cli import main
    from workbench.measure.sensitivity import SensitivityTable
    from workbench.model.data import load_text
    from workbench.plan.plan import Plan
    from workbench.runtime.serialize import load_quantized, save_tokenizer

    save_tokenizer(stories.tokenizer, sharded)  # tokenizer.bin beside the checkpoint
    text = tmp_path / "text.txt"
    text.write_text(load_text("wiki")[:20000])
    base = ["--model", str(sharded), "--stream", "--quiet", "--text", str(text)]
    scan = tmp_path / "scan.json"
    args = ["sensitivity", *base, "--method", "proxy", "--specs", "int4_g32,int8_ch"]
    assert main([*args, "--calib-seqs", "2", "--calib-seq-len", "64", "--out", str(scan)]) == 0
    tab = SensitivityTable.load(scan)
    assert tab.complete and len(tab.layers) == 36
    assert (
        tab.cost["model.layers.1.mlp.down_proj"]["int4_g32"]
        > tab.cost["model.layers.1.mlp.down_proj"]["int8_ch"]
    )
    assert main(["sensitivity", *base[:3], "--method", "fisher", "--out", str(tmp_path / "f.json")]) == 2
    assert "--stream scans with --method proxy" in capsys.readouterr().err

    insp = tmp_path / "insp"
    assert main(["inspect", *base, "--tokens", "128", "--seq-len", "64", "--out", str(insp), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["settings"]["n_seqs"] == 2 and (insp / "stats.json").is_file()

    plan = tmp_path / "plan.json"
    Plan.from_resolved({x.name: "int4_g32:gptq" for x in tab.layers if x.block is not None}).save(plan)
    q = tmp_path / "q"
    args = [
        "quantize",
        *base[:3],
        "--text",
        str(text),
        "--plan",
        str(plan),
        "--out",
        str(q),
        "--tokens",
        "128",
        "--seq-len",
        "64",
    ]
    assert main([*args, "--device", "cpu", "--json"]) == 0
    model, _ = load_quantized(q)
    assert type(model.model.layers[4].mlp.down_proj).__name__ == "QuantLinear"
    assert main(["quantize", "--model", str(tmp_path), "--stream", "--plan", str(plan), "--out", str(q)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_device_gptq_path_equals_quantize_weight(stories):
    """The path the GPU takes (gptq_quantize where W lives) gives quantize_weight's codes, run on the CPU."""
    from workbench.measure.simulate import calibration_grams
    from workbench.quant.api import quantize_weight
    from workbench.quant.spec import QuantSpec
    from workbench.streaming.devicequant import quantize_here

    name = "model.layers.1.mlp.down_proj"
    gram = calibration_grams(stories, [name], "wiki", 2, 64, use_cache=False, progress=False)[name]
    W = stories.model.get_submodule(name).weight
    spec = QuantSpec.parse("int4_g32:gptq")
    a, b = quantize_weight(W, spec, gram), quantize_here(name, W, spec, gram, device_gptq=True)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    with pytest.raises(WorkbenchError, match="needs the"):
        quantize_here(name, W, spec, gram[:8, :8], device_gptq=True)


def test_stacked_gptq_equals_one_layer_at_a_time(stories):
    """q/k/v share one Gram: GPTQ of their stacked rows (the GPU path) gives each layer's own result."""
    from workbench.measure.simulate import calibration_grams
    from workbench.quant.api import quantize_weight
    from workbench.quant.spec import QuantSpec
    from workbench.streaming.devicequant import gptq_stacked

    names = [f"model.layers.2.self_attn.{r}_proj" for r in "qkv"]
    gram = calibration_grams(stories, names[:1], "wiki", 2, 64, use_cache=False, progress=False)[names[0]]
    Ws = [stories.model.get_submodule(n).weight for n in names]
    spec = QuantSpec.parse("int3_g32:gptq")
    for W, got in zip(Ws, gptq_stacked(names, Ws, spec, gram)):
        ref = quantize_weight(W, spec, gram)
        assert torch.equal(got.codes, ref.codes) and torch.equal(got.scales, ref.scales)  # exact on the CPU
        assert torch.equal(got.zeros, ref.zeros)


def test_device_proxy_path_matches_proxy_costs(stories):
    """The GPU's proxy path (device RTN of every format, device GPTQ, the same quadratic forms), run on the
    CPU, gives sensitivity.proxy_costs' numbers."""
    from workbench.measure.sensitivity import proxy_costs
    from workbench.measure.simulate import calibration_grams
    from workbench.streaming.devicequant import proxy_costs_here

    name = "model.layers.3.self_attn.o_proj"
    gram = calibration_grams(stories, [name], "wiki", 2, 64, use_cache=False, progress=False)[name]
    W = stories.model.get_submodule(name).weight
    specs = ["int2_g64", "int4_g32", "int8_ch", "nvfp4", "fp8_e4m3", "int3_g32:gptq"]
    ref = proxy_costs(W, gram, specs)
    got = proxy_costs_here(W, gram, specs, device_path=True)
    for s in specs:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), s
    assert ref["int2_g64"] > ref["int4_g32"] > ref["int8_ch"] > 0
