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
