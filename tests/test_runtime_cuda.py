"""Runtime on CUDA (skipped without a GPU; run on the device machine): Triton kernel path vs the torch
reference inside QuantLinear, GPU RTN == CPU RTN, shape rejection, fallback warnings, CUDA-graph decode."""

from __future__ import annotations

import copy
import itertools
import zlib

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.quant.api import quantize_weight
from workbench.quant.spec import QuantSpec
from workbench.runtime.apply import apply_plan, quantize_layer
from workbench.runtime.decode import StaticDecoder
from workbench.runtime.qlinear import QuantLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

KERNEL_SPECS = [
    "int2_g32",
    "int3_g64_sym",
    "int3_ch",
    "int4_g128",
    "int4_g32_sym",
    "int4_ch",
    "int8_ch",
    "int8_g128_sym",
    "int4_t",
    "fp8_e4m3",
    "fp8_e4m3_t",
]
SHAPES = [(40, 172), (512, 1024)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(
    "spec,shape,rows,dtype",
    list(itertools.product(KERNEL_SPECS, SHAPES, (1, 3, 40), (torch.float16, torch.bfloat16))),
    ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, tuple) else f"{v[0]}x{v[1]}",
)
def test_kernel_path_matches_reference(spec, shape, rows, dtype):
    torch.manual_seed(zlib.crc32(repr((spec, shape, rows)).encode()))  # hash() of str varies per process
    N, K = shape
    qw = quantize_weight(torch.randn(N, K), spec)
    m = QuantLinear.from_quantized(qw, torch.randn(N), name="l", dtype=dtype, device="cuda")
    assert m.has_kernel
    x = torch.randn(rows, K, device="cuda", dtype=dtype)
    ref = x.double() @ qw.dequantize().to("cuda", torch.float64).t() + m.bias.double()
    y = m(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert _rel(y, ref) < (8e-3 if dtype == torch.bfloat16 else 1.5e-3), _rel(y, ref)


@pytest.mark.parametrize("spec", ["int4_g128", "int3_g64_sym", "int2_ch", "int8_t", "int4_t_sym"])
def test_gpu_rtn_equals_cpu_rtn(spec):
    torch.manual_seed(3)
    W = torch.randn(256, 640)
    a = quantize_layer("l", W.cuda(), QuantSpec.parse(spec))
    b = quantize_weight(W, spec)
    assert torch.equal(a.codes.cpu(), b.codes) and torch.equal(a.scales.cpu(), b.scales)


def test_unsupported_group_rejected_on_cuda(stories):
    model = copy.deepcopy(stories.model).cuda().half()
    name = "model.layers.1.mlp.down_proj"
    with pytest.raises(WorkbenchError, match=name):
        apply_plan(model, {name: "int4_g48"})
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    apply_plan(model, {name: "int4_g48"}, backend="reference")  # explicit reference path is allowed
    assert isinstance(model.get_submodule(name), QuantLinear)


def test_fallback_format_warns_and_matches(stories):
    qw = quantize_weight(torch.randn(64, 172), "nvfp4")
    m = QuantLinear.from_quantized(
        qw, name="model.layers.0.mlp.up_proj.nvfp4", dtype=torch.float16, device="cuda"
    )
    x = torch.randn(2, 172, device="cuda", dtype=torch.float16)
    with pytest.warns(UserWarning, match="model.layers.0.mlp.up_proj.nvfp4"):
        y = m(x)
    ref = (x.float() @ qw.dequantize().cuda().t()).half()
    torch.testing.assert_close(y, ref, rtol=2e-3, atol=2e-3)


def test_compiled_forward_uses_custom_op():
    qw = quantize_weight(torch.randn(256, 512), "int4_g128")
    m = QuantLinear.from_quantized(qw, name="c", dtype=torch.float16, device="cuda")
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    f = torch.compile(lambda t: torch.nn.functional.silu(m(t)) * 2, fullgraph=True)
    torch.testing.assert_close(f(x), torch.nn.functional.silu(m(x)) * 2, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_graph_decode_matches_eager(stories, mode):
    model = copy.deepcopy(stories.model).cuda().half()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    apply_plan(model, {n: ("int8_ch" if i % 2 else "int4_g32") for i, n in enumerate(names)})
    ids = stories.tokenizer.encode("Once upon a time", add_bos=True)
    eager = StaticDecoder(model, max_cache_len=96, mode="eager").generate(ids, 48)
    fast = StaticDecoder(model, max_cache_len=96, mode=mode)
    out = fast.generate(ids, 48)
    assert out.tokens == eager.tokens
    assert fast.generate(ids[:2], 20).tokens == StaticDecoder(model, 96, "eager").generate(ids[:2], 20).tokens


def _fast_cuda_model(stories):
    model = copy.deepcopy(stories.model).cuda().half()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    plan = {n: ("int4_g32" if "self_attn" in n else "int8_ch") for n in names}
    plan["model.layers.2.self_attn.v_proj"] = "int8_ch"  # one group left unfused
    apply_plan(model, plan)
    return model


def test_fast_path_decode_steps_match_hf_on_cuda(stories):
    """Teacher-forced: the fast decode step's logits at each position against the HF model's."""
    from workbench.runtime.fastpath import FastDecoder

    model = _fast_cuda_model(stories)
    ids = stories.tokenizer.encode("Once upon a time", add_bos=True)
    ref = StaticDecoder(model, max_cache_len=96, mode="eager").generate(ids, 48).tokens
    x = torch.tensor(ids + ref, device="cuda")
    with torch.no_grad():
        want = model(x[None]).logits[0].float()  # [T, V]
        dec = FastDecoder(model, max_cache_len=96, mode="eager")
        assert len(dec.notes) == 1 and "layers.2.self_attn" in dec.notes[0]
        dec.prefill(x[: len(ids)])
        got = []
        for t in ref[:-1]:
            dec.tok.fill_(t)
            got.append(dec._forward_step().float()[0])
            dec.pos.add_(1)
    got = torch.stack(got)  # logits after ref[0..46]
    w = want[len(ids) : len(ids) + len(got)]
    assert (got - w).abs().max() < 2e-2 * w.abs().max()
    assert (got.argmax(-1) == w.argmax(-1)).float().mean() >= 0.95
    prefill = FastDecoder(model, 96, "eager").logits(x).float()
    assert (prefill - want).abs().max() < 2e-2 * want.abs().max()


@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_fast_path_graph_and_compile_decode(stories, mode):
    """The captured step replays the eager step's kernels (same tokens); compiled, the first tokens agree."""
    from workbench.runtime.fastpath import FastDecoder

    model = _fast_cuda_model(stories)
    ids = stories.tokenizer.encode("Once upon a time", add_bos=True)
    eager = FastDecoder(model, max_cache_len=96, mode="eager").generate(ids, 48).tokens
    dec = FastDecoder(model, max_cache_len=96, mode=mode)
    out = dec.generate(ids, 48).tokens
    n = 48 if mode == "graph" else 16  # inductor fuses the norms (other fp16 rounding)
    assert out[:n] == eager[:n]
    assert (
        dec.generate(ids[:2], 20).tokens[:8]
        == FastDecoder(model, 96, "eager").generate(ids[:2], 20).tokens[:8]
    )
