"""The format registry: every format answers for itself, and QuantLinear's buffers come from it.

A QuantLinear built empty from a spec (how `load_quantized` rebuilds a saved model) must have exactly the
buffer names, shapes and dtypes of one packed from a real weight, for every format; the kernel decisions and
GGUF types read from the registry match the documented table.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from workbench.model.inventory import get_linear_weight
from workbench.quant.api import quantize_weight
from workbench.quant.registry import FORMATS, decode, encode, format_of
from workbench.quant.spec import QuantSpec
from workbench.runtime.qlinear import QuantLinear, kernel_format_reason

ONE_SPEC = {
    "int": ["int4_g32", "int3_ch_sym", "int8_t", "int2_g64:gptq"],
    "fp8_e4m3": ["fp8_e4m3", "fp8_e4m3_t"],
    "fp8_e5m2": ["fp8_e5m2"],
    "fp4_e2m1": ["fp4_e2m1_g32"],
    "mxfp4": ["mxfp4"],
    "nvfp4": ["nvfp4"],
    "nf4": ["nf4_g64"],
}


def test_every_quantized_format_has_specs_here():
    assert set(ONE_SPEC) == {name for name, f in FORMATS.items() if f.is_quantized}
    assert {name for name, f in FORMATS.items() if not f.is_quantized} == {"bf16", "fp16"}


@pytest.mark.parametrize("spec", [s for specs in ONE_SPEC.values() for s in specs])
def test_empty_layer_has_the_packed_layout(stories, spec):
    # a real weight: stories260K's FFN down projection [64, 172] (K not a multiple of any group)
    W = get_linear_weight(stories.model.get_submodule("model.layers.1.mlp.down_proj")).detach()
    s = QuantSpec.parse(spec)
    gram = torch.eye(W.shape[1]) if s.needs_gram else None
    packed = QuantLinear.from_quantized(quantize_weight(W, s, gram), name="l")
    empty = QuantLinear(s, W.shape[1], W.shape[0], name="l")
    a, b = dict(packed.named_buffers()), dict(empty.named_buffers())
    assert set(a) == set(b) == set(k for k in s.format.layout.buffers if a.get(k) is not None)
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


def _direct(spec: str, Wg: torch.Tensor) -> torch.Tensor:
    """decode(encode(Wg)) written with the format primitives themselves (no registry)."""
    from workbench.quant import formats as fm
    from workbench.quant import formats_float as ff

    if spec == "int4_g32":
        scales, zeros = fm.int_params(Wg, 4, False)
        return fm.int_decode(fm.int_encode(Wg, scales, zeros, 4), scales, zeros)
    if spec.startswith("fp8"):
        mf = ff.E4M3 if spec == "fp8_e4m3" else ff.E5M2
        return ff.scaled_decode(*ff.fp8_encode(Wg, mf), mf)
    if spec in ("fp4_e2m1_g32", "mxfp4"):
        return ff.scaled_decode(*(ff.fp4_encode if spec == "fp4_e2m1_g32" else ff.mxfp4_encode)(Wg), ff.E2M1)
    if spec == "nvfp4":
        codes, scales, ts = ff.nvfp4_encode(Wg)
        return ff.scaled_decode(codes, scales, ff.E2M1) * ts
    return ff.nf4_decode(*ff.nf4_encode(Wg))


def test_encode_decode_dispatch_to_each_formats_primitives(stories):
    W = get_linear_weight(stories.model.get_submodule("model.layers.0.self_attn.q_proj")).detach().float()
    for specs in ONE_SPEC.values():
        s = QuantSpec.parse(specs[0])
        Wg = W.reshape(W.shape[0], -1, s.group_size) if s.granularity == "group" else W.unsqueeze(1)
        assert torch.equal(decode(s, encode(s, Wg)), _direct(specs[0], Wg)), s


def test_kernels_and_gguf_types_come_from_the_registry():
    has_kernel = [
        s for specs in ONE_SPEC.values() for s in specs if kernel_format_reason(QuantSpec.parse(s)) is None
    ]
    assert has_kernel == ["int4_g32", "int3_ch_sym", "int8_t", "int2_g64:gptq", "fp8_e4m3", "fp8_e4m3_t"]
    assert (
        kernel_format_reason(QuantSpec.parse("int5_g32"))
        == "no kernel for 5-bit integers (kernels: (2, 3, 4, 8))"
    )
    gguf = {
        s: format_of(QuantSpec.parse(s)).gguf(QuantSpec.parse(s)) for s in ("int4_g32", "nf4_g64", "bf16")
    }
    assert gguf == {"int4_g32": "q4_K", "nf4_g64": "iq4_nl", "bf16": "bf16"}


def test_public_api_resolves_without_the_ui():
    code = (
        "import sys, workbench\n"
        "missing = [n for n in workbench.__all__ if getattr(workbench, n, None) is None]\n"
        "assert not missing, missing\n"
        "front = ('workbench.ui', 'workbench.commands', 'panel')\n"
        "ui = sorted(m for m in sys.modules if m.startswith(front))\n"
        "assert not ui, ui\n"
        "print(len(workbench.__all__))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= 40


def test_a_new_format_is_one_registry_entry(stories, monkeypatch):
    """FP6 E3M2 with an fp32 scale per channel, added as one entry (its primitives are the generic minifloat
    ones): parsing, printing, accounting, quantization, packing, the reference forward and the kernel
    decision all follow without touching another file."""
    import dataclasses

    from workbench.quant import formats_float as ff
    from workbench.quant import registry
    from workbench.quant.formats import Encoded

    e3m2 = ff.Minifloat("e3m2", 3, 2, 3, 28.0)
    fp6 = dataclasses.replace(
        FORMATS["fp8_e5m2"],
        name="fp6_e3m2",
        code_bits=6,
        encode=lambda spec, Wg, shrink=None: Encoded(*ff.fp8_encode(Wg, e3m2, shrink), None),
        decode=lambda spec, enc: ff.scaled_decode(enc.codes, enc.scales, e3m2),
    )
    monkeypatch.setitem(registry.FORMATS, "fp6_e3m2", fp6)
    s = QuantSpec.parse("fp6_e3m2")
    assert (str(s), s.bits, s.granularity) == ("fp6_e3m2", 6, "channel")
    assert str(QuantSpec.parse("FP6_E3M2_t")) == "fp6_e3m2_t"
    W = get_linear_weight(stories.model.get_submodule("model.layers.2.mlp.up_proj")).detach()  # [172, 64]
    N, K = W.shape
    assert s.storage_bits(N, K) == 6 * N * K + 32 * N
    qw = quantize_weight(W, s)
    assert int(qw.codes.max()) < 64 and float((qw.dequantize() - W).abs().max()) < float(W.abs().max()) / 8
    m = QuantLinear.from_quantized(qw, name="new")
    assert (
        torch.equal(m.dequantize(), qw.dequantize()) and kernel_format_reason(s) == "no kernel for fp6_e3m2"
    )
    x = torch.randn(3, K)
    torch.testing.assert_close(m(x), x @ qw.dequantize().t(), rtol=1e-5, atol=1e-5)
