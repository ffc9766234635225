"""Saving and loading quantized models (exact round trip, version checks) and the static-cache decoder."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.runtime.apply import apply_plan
from workbench.runtime.decode import StaticDecoder, greedy_generate
from workbench.runtime.qlinear import QuantLinear
from workbench.runtime.serialize import load_quantized, load_tokenizer, read_manifest, save_quantized


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.fixture(scope="module")
def saved(stories, tmp_path_factory):
    model = copy.deepcopy(stories.model)
    names = _linear_names(model)
    cycle = ["int4_g32", "int3_g64_sym", "int2_g16", "int8_ch", "fp8_e4m3", "nf4_g64", "bf16", "nvfp4"]
    plan = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
    plan["lm_head"] = "int8_ch"  # tied to the embedding in stories260K: the table must stay intact
    with pytest.warns(UserWarning):
        apply_plan(model, plan)
    folder = tmp_path_factory.mktemp("q") / "stories_mixed"
    save_quantized(model, plan, folder, tokenizer=stories.tokenizer, source="stories260K")
    return model, plan, folder


def test_round_trip_is_exact(saved, stories):
    model, plan, folder = saved
    loaded, loaded_plan = load_quantized(folder)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert {n: str(m.spec) for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == {
        n: str(m.spec) for n, m in model.named_modules() if isinstance(m, QuantLinear)
    }
    from workbench.model.inventory import layer_inventory
    from workbench.quant.spec import QuantSpec

    resolved = loaded_plan.resolve(layer_inventory(stories.model))
    assert {n: str(s) for n, s in resolved.items()} == {n: str(QuantSpec.parse(s)) for n, s in plan.items()}
    ids = torch.tensor([stories.tokenizer.encode("Once upon a time", add_bos=True)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    tok = load_tokenizer(folder)
    assert tok.encode("Lily saw a big dog.") == stories.tokenizer.encode("Lily saw a big dog.")


def _rewrite_metadata(src, dst, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src / "model.safetensors"), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta.update(changes)
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata=meta)
    return dst


def test_unknown_layout_version_is_refused(saved, tmp_path):
    _, _, folder = saved
    bad = _rewrite_metadata(folder, tmp_path / "v99", layout_version="99")
    with pytest.raises(WorkbenchError, match="layout version '99' is unknown"):
        load_quantized(bad)
    other = _rewrite_metadata(folder, tmp_path / "other", format="something.else")
    with pytest.raises(WorkbenchError, match="not a workbench quantized model"):
        read_manifest(other)
    with pytest.raises(WorkbenchError, match="no model.safetensors"):
        load_quantized(tmp_path)


def test_manifest_records_layers_and_version(saved):
    _, plan, folder = saved
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["layout_version"] == 1 and manifest["format"] == "workbench.quantized"
    assert manifest["layers"]["lm_head"]["spec"] == "int8_ch"
    assert {n for n, s in plan.items() if s != "bf16"} == set(manifest["layers"])


def _as_w8a8(model, source, names: dict[str, tuple[str, str]]) -> None:
    """Swap `names` (layer -> (weight spec, act spec)) for the W8A8 modules apply_plan builds from CUDA
    weights, built here on the CPU from `source`'s weights (the same transformed model before apply_plan)."""
    from workbench.model.inventory import get_linear_weight
    from workbench.quant.act import ActSpec
    from workbench.quant.api import quantize_weight
    from workbench.quant.spec import QuantSpec
    from workbench.runtime.act_linear import ActQuantLinear
    from workbench.transform.rotate import carry_online_hadamard

    for name, (wspec, act) in names.items():
        src = source.get_submodule(name)
        qw = quantize_weight(get_linear_weight(src), QuantSpec.parse(wspec))
        m = ActQuantLinear.from_quantized(qw, ActSpec.parse(act), src.bias, name, "cpu", torch.float32)
        carry_online_hadamard(src, m)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, m)


W8A8_LAYERS = {
    "model.layers.0.self_attn.q_proj": ("int8_ch_sym", "int8_tok_sym"),
    "model.layers.1.mlp.down_proj": ("int8_ch_sym", "int8_tok_sym"),  # with its online Hadamard
    "model.layers.2.mlp.gate_proj": ("fp8_e4m3", "fp8_e4m3_tok"),
    "model.layers.3.self_attn.o_proj": ("fp8_e4m3", "fp8_e4m3_tok"),
}


@pytest.fixture(scope="module")
def saved_w8a8(stories, tmp_path_factory):
    """A rotated stories260K with W8A8 layers (int8 and FP8) and simulated activation specs, saved."""
    from workbench.plan.plan import Plan, Rule
    from workbench.plan.transforms import Hadamard
    from workbench.transform.apply import apply_transforms

    fp8 = [Rule(f"role:{r}", "fp8_e4m3", "fp8_e4m3_tok") for r in ("gate", "o")]
    plan = Plan(
        default="int8_ch_sym",
        act="int8_tok_sym",
        rules=[*fp8, Rule("lm_head", "bf16", "none")],
        transforms=[Hadamard("residual", 0), Hadamard("down", 0)],
    )
    t = apply_transforms(stories, plan.transforms)
    source = copy.deepcopy(t.model)
    report = apply_plan(t.model, plan.resolve(t.model), warn=False)  # CPU: QuantLinear + input hooks
    _as_w8a8(t.model, source, W8A8_LAYERS)
    folder = tmp_path_factory.mktemp("q") / "stories_w8a8"
    save_quantized(t.model, plan, folder, tokenizer=stories.tokenizer)
    return t.model, plan, report, folder


def test_w8a8_and_rotated_model_round_trips_to_identical_logits(saved_w8a8, tmp_path):
    from workbench.runtime.act_linear import ActQuantLinear

    model, plan, report, folder = saved_w8a8
    loaded, back = load_quantized(folder)
    kinds = {
        n: type(m).__name__ for n, m in loaded.named_modules() if isinstance(m, (QuantLinear, ActQuantLinear))
    }
    assert kinds == {n: type(m).__name__ for n, m in model.named_modules() if n in kinds} and len(kinds) == 35
    assert {n: (m.kind, str(m.act)) for n, m in loaded.named_modules() if isinstance(m, ActQuantLinear)} == {
        n: ("int8" if w == "int8_ch_sym" else "fp8", a) for n, (w, a) in W8A8_LAYERS.items()
    }
    assert loaded.get_submodule("model.layers.2.mlp.gate_proj").w_q.dtype == torch.float8_e4m3fn
    assert hasattr(loaded.get_submodule("model.layers.1.mlp.down_proj"), "online_hadamard")
    manifest = read_manifest(folder)
    assert manifest["layout_version"] == 2 and len(manifest["acts"]) == 35 - len(W8A8_LAYERS)
    assert set(manifest["acts"]) == set(report.act_simulated) - set(W8A8_LAYERS)
    assert back.transforms == plan.transforms and loaded.workbench_transforms == tuple(plan.transforms)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[1, 200, 31, 7, 99, 4, 50, 3] * 4])
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
        no_acts = _rewrite_manifest(folder, tmp_path / "no_acts", lambda m: m.update(acts={}))
        unhooked = load_quantized(no_acts)[0](input_ids=ids).logits
    assert torch.equal(ref, got)
    assert float((unhooked - ref).abs().max()) > 1e-3  # without the input hooks: other logits
    again = load_quantized(folder, dtype=torch.bfloat16)[0]  # .to(dtype) keeps the e4m3 codes and fp32 scales
    assert again.get_submodule("model.layers.2.mlp.gate_proj").w_q.dtype == torch.float8_e4m3fn
    assert again.get_submodule("model.layers.0.self_attn.q_proj").s_w.dtype == torch.float32


def _rewrite_manifest(src, dst, edit):
    """A copy of the saved model `src` whose header manifest is `edit(manifest)`."""
    manifest = read_manifest(src)
    edit(manifest)
    return _rewrite_metadata(
        src, dst, manifest=json.dumps(manifest), layout_version=str(manifest["layout_version"])
    )


def test_version_1_files_load_and_unknown_layer_kinds_are_refused(saved, saved_w8a8, tmp_path):
    model, _, folder = saved

    def as_version_1(m):  # what the workbench wrote before W8A8 layers were saved: no kinds, no acts
        assert m["layout_version"] == 1
        m.pop("acts")
        for entry in m["layers"].values():
            entry.pop("kind")

    old = _rewrite_manifest(folder, tmp_path / "v1", as_version_1)
    loaded, _ = load_quantized(old)
    ids = torch.tensor([[1, 200, 31, 7, 99, 4, 50, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    w8a8 = saved_w8a8[3]
    unknown = _rewrite_manifest(
        w8a8, tmp_path / "w4a4", lambda m: m["layers"]["model.layers.2.mlp.gate_proj"].update(kind="w4a4")
    )
    with pytest.raises(
        WorkbenchError, match="layer 'model.layers.2.mlp.gate_proj' is of kind 'w4a4', unknown"
    ):
        load_quantized(unknown)


def test_static_decoder_matches_hf_generate(stories):
    model = copy.deepcopy(stories.model)
    apply_plan(model, {n: "int4_g32" for n in _linear_names(model)})
    ids = stories.tokenizer.encode("Once upon a time", add_bos=True)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0, len(ids) :].tolist()
    dec = StaticDecoder(model, max_cache_len=64)
    first = dec.generate(ids, 30)
    assert first.tokens == ref and first.mode == "eager"
    again = dec.generate(ids[:3], 10)  # the cache is reset between calls
    assert (
        again.tokens
        == model.generate(torch.tensor([ids[:3]]), max_new_tokens=10, do_sample=False)[0, 3:].tolist()
    )
    with pytest.raises(WorkbenchError, match="exceed the cache length"):
        dec.generate(ids, 64)
    with pytest.raises(WorkbenchError, match="needs the model on CUDA"):
        StaticDecoder(model, mode="graph")


def test_eager_attention_mask_path(stories):
    model = copy.deepcopy(stories.model)
    model.config._attn_implementation = "eager"
    ids = stories.tokenizer.encode("The cat", add_bos=True)
    ref = stories.model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[
        0, len(ids) :
    ].tolist()
    assert greedy_generate(model, ids, 20).tokens == ref
