"""QuantLinear and apply_plan on CPU: reference forward == x @ dequantize()^T, greedy text kept at int8,
mixed plans equal to fake quantization, atomic apply, real memory, kernel-support decisions."""

from __future__ import annotations

import copy
import itertools
import zlib

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.quant.api import quantize_weight
from workbench.quant.packing import packed_nbytes
from workbench.quant.spec import QuantSpec
from workbench.runtime.apply import apply_plan
from workbench.runtime.memory import model_memory
from workbench.runtime.qlinear import QuantLinear, kernel_format_reason, kernel_shape_reason

INT_SPECS = [
    f"int{b}_{g}{s}" for b, g, s in itertools.product((2, 3, 4, 8), ("g32", "g128", "ch"), ("", "_sym"))
]
FLOAT_SPECS = ["fp8_e4m3", "fp8_e4m3_t", "int4_t", "int8_t_sym"]
FALLBACK_SPECS = ["fp8_e5m2", "fp4_e2m1_g32", "mxfp4", "nvfp4", "nf4_g64", "int5_g64", "int6_ch"]
SHAPES = [(40, 172), (96, 576)]


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize(
    "spec,shape",
    list(itertools.product(INT_SPECS + FLOAT_SPECS, SHAPES)),
    ids=lambda v: v if isinstance(v, str) else f"{v[0]}x{v[1]}",
)
def test_reference_forward_equals_dequantized_matmul(spec, shape):
    torch.manual_seed(zlib.crc32(repr((spec, shape)).encode()))  # hash() of str varies per process
    N, K = shape
    W, b = torch.randn(N, K), torch.randn(N)
    qw = quantize_weight(W, spec)
    if QuantSpec.parse(spec).bits not in (2, 3, 4, 8):
        pytest.skip("no packed layout")
    m = QuantLinear.from_quantized(qw, b, name="layer")
    assert torch.equal(m.dequantize(), qw.dequantize()), "packing lost information"
    x = torch.randn(3, 5, K)
    y = m(x)
    assert y.shape == (3, 5, N)
    torch.testing.assert_close(y, x @ qw.dequantize().t() + b, rtol=1e-5, atol=1e-5)


def test_cpu_reference_unpacks_once_and_follows_buffer_changes():
    """No-grad CPU calls reuse one unpacked weight; an in-place change of the packed codes or a move drops
    it; with gradients recorded nothing is kept (the copy would outlive the graph)."""
    torch.manual_seed(3)
    W = torch.randn(64, 128)
    m = QuantLinear.from_quantized(quantize_weight(W, "int4_g32"), name="cached")
    x = torch.randn(2, 128)
    y0 = x @ m.dequantize().t()
    with torch.no_grad():
        torch.testing.assert_close(m(x), y0, rtol=1e-5, atol=1e-5)
        first = m.__dict__["_ref_cache"][1]
        m(x)
        assert m.__dict__["_ref_cache"][1] is first  # not unpacked again
        m.packed.bitwise_xor_(0x11111111)  # flip code bits in place: the weight changes
        y1 = m(x)
    assert m.__dict__["_ref_cache"][1] is not first
    torch.testing.assert_close(y1, x @ m.dequantize().t(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y1, y0)
    m.to(torch.float64)  # a move (here a no-op for the packed buffers) drops the copy
    assert "_ref_cache" not in m.__dict__
    m(x)  # gradients recorded: nothing kept
    assert "_ref_cache" not in m.__dict__


@pytest.mark.parametrize("spec", FALLBACK_SPECS)
def test_formats_without_kernel_run_the_same_math(spec):
    torch.manual_seed(1)
    W = torch.randn(48, 200)
    s = QuantSpec.parse(spec)
    if s.fmt == "int":  # 5/6-bit integers have no packed layout: refused with the layer name
        with pytest.raises(WorkbenchError, match="layer 'odd'"):
            QuantLinear.from_quantized(quantize_weight(W, spec), name="odd")
        return
    qw = quantize_weight(W, spec)
    m = QuantLinear.from_quantized(qw, name="fb")
    assert kernel_format_reason(s) is not None and not m.has_kernel
    x = torch.randn(4, 200)
    torch.testing.assert_close(m(x), x @ qw.dequantize().t(), rtol=1e-5, atol=1e-5)


def test_awq_input_scale_is_applied():
    torch.manual_seed(2)
    W, X = torch.randn(64, 128), torch.randn(256, 128) * torch.linspace(0.1, 4, 128)
    qw = quantize_weight(W, "int4_g32:awq", gram=X.t() @ X)
    assert qw.input_scale is not None
    m = QuantLinear.from_quantized(qw, name="awq")
    x = torch.randn(7, 128)
    torch.testing.assert_close(m(x), x @ qw.dequantize().t(), rtol=1e-4, atol=1e-4)


def test_dtype_moves_keep_storage_types():
    qw = quantize_weight(torch.randn(32, 64), "fp8_e4m3")
    m = QuantLinear.from_quantized(qw, torch.randn(32), name="l").to(torch.bfloat16)
    assert (
        m.scales.dtype == torch.float32 and m.packed.dtype == torch.int32 and m.bias.dtype == torch.bfloat16
    )
    qi = QuantLinear.from_quantized(quantize_weight(torch.randn(32, 64), "int4_g32"), name="i").half()
    assert qi.packed.dtype == torch.int32 and qi.scales.dtype == torch.float16


def test_kernel_support_decisions():
    assert kernel_shape_reason(QuantSpec.parse("int4_g128"), 4096, 14336) is None
    assert kernel_shape_reason(QuantSpec.parse("int4_ch"), 576, 1536) is None
    assert "group_size=48" in kernel_shape_reason(QuantSpec.parse("int4_g48"), 64, 576)
    assert kernel_format_reason(QuantSpec.parse("nvfp4")) == "no kernel for nvfp4"
    assert kernel_format_reason(QuantSpec.parse("fp8_e4m3")) is None


def test_int8_plan_keeps_greedy_text(stories):
    model = copy.deepcopy(stories.model)
    ids = torch.tensor([stories.tokenizer.encode("Once upon a time", add_bos=True)])
    ref = stories.model.generate(ids, max_new_tokens=40, do_sample=False)
    report = apply_plan(model, {n: "int8_ch" for n in _linear_names(model)})
    assert len(report.layers) == len(_linear_names(stories.model)) and not report.fallback
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in report.layers)
    out = model.generate(ids, max_new_tokens=40, do_sample=False)
    assert torch.equal(out, ref)


def test_mixed_plan_equals_fake_quantization(stories):
    model = copy.deepcopy(stories.model)
    names = _linear_names(model)
    cycle = ["int4_g32", "int3_g64_sym", "int2_g16", "int8_ch", "fp8_e4m3", "nf4_g64", "bf16", "nvfp4"]
    plan = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
    fake = copy.deepcopy(stories.model)
    with torch.no_grad():
        for n, s in plan.items():
            if QuantSpec.parse(s).is_quantized:
                mod = fake.get_submodule(n)
                mod.weight = torch.nn.Parameter(quantize_weight(mod.weight, s).dequantize())
    with pytest.warns(UserWarning, match="no GPU kernel"):
        report = apply_plan(model, plan)
    assert set(report.fallback) == {n for n, s in plan.items() if s in ("nf4_g64", "nvfp4")}
    assert report.kept == [n for n, s in plan.items() if s == "bf16"]
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in report.kept)
    ids = torch.tensor([stories.tokenizer.encode("The little dog ran to the park and", add_bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fake(ids).logits, rtol=1e-4, atol=1e-4)


def test_real_memory_matches_packed_sizes(stories):
    model = copy.deepcopy(stories.model)
    before = model_memory(model)
    report = apply_plan(model, {n: "int4_g32" for n in _linear_names(model)})
    expected = 0
    for n in report.layers:
        q = model.get_submodule(n)
        N, K = q.out_features, q.in_features
        ng = -(-K // 32)
        expected += packed_nbytes(N, K, 4) + 2 * 2 * N * ng  # codes + fp16 scales + fp16 zeros
    after = report.memory_after
    assert after.quantized_bytes == expected
    # stories260K ties lm_head to the embedding: the table stays (other_bytes), the linears shrink ~7x
    assert after.other_bytes == before.other_bytes
    assert after.linear_bytes == 0 and after.total_bytes < before.total_bytes


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("injected failure"), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")],
)
def test_failed_apply_leaves_model_intact(stories, exc):
    model = copy.deepcopy(stories.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([stories.tokenizer.encode("Once upon a time", add_bos=True)])
    with torch.no_grad():
        ref = model(ids).logits

    def fail_at_fifth(name, i, total):
        if i == 4:
            raise exc

    expected = WorkbenchError if isinstance(exc, torch.OutOfMemoryError) else RuntimeError
    with pytest.raises(expected) as info:
        apply_plan(model, {n: "int4_g32" for n in _linear_names(model)}, on_layer=fail_at_fifth)
    if expected is WorkbenchError:
        assert "out of memory" in str(info.value) and "unchanged" in str(info.value)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_bad_plans_are_refused_before_any_work(stories):
    model = copy.deepcopy(stories.model)
    with pytest.raises(WorkbenchError, match="model.layers.99.mlp.up_proj"):
        apply_plan(model, {"model.layers.99.mlp.up_proj": "int4_g32"})
    with pytest.raises(WorkbenchError, match="unknown part"):
        apply_plan(model, {_linear_names(model)[0]: "int4_q32"})
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_plans_without_a_packed_layout_fall_back_to_the_dequantized_weight(stories):
    """The allocator's own candidates (int6, int5) run: a dense dequantized weight, one warning naming them;
    backend='dequantized' does that for every layer and equals fake quantization."""
    names = _linear_names(stories.model)
    plan = {
        n: ("int6_g128" if i % 3 == 0 else "int5_g128" if i % 3 == 1 else "int4_g32")
        for i, n in enumerate(names)
    }
    fake = copy.deepcopy(stories.model)
    with torch.no_grad():
        for n, s in plan.items():
            mod = fake.get_submodule(n)
            mod.weight = torch.nn.Parameter(quantize_weight(mod.weight, s).dequantize())
    ids = torch.tensor([stories.tokenizer.encode("The little dog ran to the park and", add_bos=True)])
    model = copy.deepcopy(stories.model)
    with pytest.warns(UserWarning, match=r"no packed layout.*model\.layers\.0\.self_attn\.q_proj"):
        report = apply_plan(model, plan)
    assert set(report.fallback) == {n for n, s in plan.items() if s != "int4_g32"}
    assert isinstance(model.get_submodule(names[2]), QuantLinear)
    assert not isinstance(model.get_submodule(names[0]), QuantLinear)
    dense = copy.deepcopy(stories.model)
    report = apply_plan(dense, plan, backend="dequantized")
    assert set(report.fallback) == set(names) and not any(isinstance(m, QuantLinear) for m in dense.modules())
    emb = stories.model.get_input_embeddings().weight  # tied to lm_head: must not change
    assert torch.equal(dense.get_input_embeddings().weight, emb) and "lm_head" in names
    with torch.no_grad():
        want = fake(ids).logits
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dense(ids).logits, want, rtol=1e-5, atol=1e-5)
