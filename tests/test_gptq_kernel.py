"""GPTQ's column loop as one Triton launch per block (kernels/gptq_block.py) against its torch twin and
against quant/gptq.py's torch loop, on stories260K's real weights and Grams.

Without CUDA the kernel runs in the Triton interpreter and must equal the torch ops bit for bit. On CUDA
the compiled kernel may fuse a multiply and a subtraction (FMA), so a code may move by one step where
w / s sits on a rounding boundary: at most 0.5% of the codes, each by one, and the layer's output error
tr(D G D^T) / tr(W G W^T) within 2% of the torch loop's.
"""

from __future__ import annotations

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import pytest  # noqa: E402
from workbench.kernels.gptq_block import gptq_block  # noqa: E402
from workbench.kernels.reference import gptq_block_ref  # noqa: E402

from workbench.quant.gptq import gptq_quantize  # noqa: E402
from workbench.quant.metrics import output_error  # noqa: E402
from workbench.quant.spec import QuantSpec  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
CODE_MISMATCH = 0.005  # fraction of codes allowed to differ (by one) on CUDA


def _close_codes(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if not CUDA:
        assert torch.equal(a, b), f"{what}: interpreter codes differ from torch"
        return
    diff = (a.int() - b.int()).abs()
    assert int(diff.max()) <= 1, f"{what}: a code moved by {int(diff.max())}"
    frac = float((diff > 0).float().mean())
    assert frac <= CODE_MISMATCH, f"{what}: {frac:.4f} of the codes differ"


def _upper_inverse_factor(K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * K, K, generator=g, dtype=torch.float64)
    H = X.T @ X + 0.1 * torch.eye(K, dtype=torch.float64)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()


@pytest.mark.parametrize("N,B", [(37, 32), (64, 128), (9, 100)], ids=str)
def test_block_kernel_equals_its_torch_twin(N, B):
    """One block, masked row and column edges, per-weight scales and zeros (4-bit asymmetric)."""
    g = torch.Generator().manual_seed(N + B)
    W1 = torch.randn(N, B, generator=g)
    Hinv1 = _upper_inverse_factor(B, B)
    S1 = (W1.abs().amax(1, keepdim=True) / 7.5).expand(N, B)
    Z1 = torch.full((N, 1), 8.0).expand(N, B)
    args = [t.to(DEV) for t in (W1, Hinv1, S1, Z1)]
    codes, err = gptq_block(*args, 15.0)
    rc, re = gptq_block_ref(*args, 15.0)
    _close_codes(codes, rc, f"[{N}, {B}]")
    if not CUDA:
        assert torch.equal(err, re)
    assert int(codes.max()) <= 15


@pytest.fixture(scope="module")
def layer_gram(stories):
    from workbench.measure.simulate import calibration_grams

    name = "model.layers.1.mlp.down_proj"
    gram = calibration_grams(stories, [name], "wiki", 2, 64, use_cache=False, progress=False)[name]
    return stories.model.get_submodule(name).weight.detach().float(), gram


CASES = [  # spec, blocksize, act_order: blocksize = group size makes both loops block alike (exact case)
    ("int4_g32", 32, False),
    ("int4_g128", 128, False),  # the 70B run's spec; K = 172: a short last group
    ("int3_g32_sym", 32, False),
    ("int8_ch", 128, False),
    ("int4_g32", 128, True),
    ("int4_g32", 128, False),  # kernel blocks of one group, the torch loop of 4 groups: equal to rounding
]


@pytest.mark.parametrize("spec,blocksize,act_order", CASES, ids=str)
def test_gptq_with_the_kernel_equals_the_torch_loop(layer_gram, spec, blocksize, act_order):
    W, gram = layer_gram
    sp = QuantSpec.parse(spec)
    kw = dict(blocksize=blocksize, act_order=act_order)
    ref = gptq_quantize(W, sp, gram, column_kernel=False, **kw)
    got = gptq_quantize(W.to(DEV), sp, gram.to(DEV), column_kernel=True, **kw)
    exact = not CUDA and (blocksize == sp.group_size or sp.granularity != "group" or act_order)
    codes, scales = got[0].cpu(), got[1].cpu()
    if exact:
        assert torch.equal(codes, ref[0]) and torch.equal(scales, ref[1]), spec
        assert (ref[2] is None) == (got[2] is None) and (ref[2] is None or torch.equal(got[2].cpu(), ref[2]))
    else:
        _close_codes_loose(codes, ref[0], spec)
    err_ref = output_error(W, _dequant(sp, *ref[:3]), gram)
    err_got = output_error(W, _dequant(sp, codes, scales, None if got[2] is None else got[2].cpu()), gram)
    assert err_got == pytest.approx(err_ref, rel=0.02), (spec, err_got, err_ref)


def _close_codes_loose(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Two GPTQ runs that round differently drift apart along K: a few codes, mostly by one."""
    diff = (a.int() - b.int()).abs()
    frac = float((diff > 0).float().mean())
    assert frac <= 0.02, f"{what}: {frac:.4f} of the codes differ"


def _dequant(spec: QuantSpec, codes, scales, zeros) -> torch.Tensor:
    from workbench.quant.api import QuantizedWeight

    return QuantizedWeight(spec, codes, scales, zeros).dequantize().float()


@pytest.mark.skipif(not CUDA, reason="the streamed GPU path of GPTQ")
def test_streamed_gptq_on_cuda_is_close_to_quantize_weight(stories, layer_gram):
    """quantize_here / gptq_stacked on CUDA (the kernel, blocks of one group) against the CPU reference."""
    from workbench.quant.api import quantize_weight
    from workbench.streaming.devicequant import gptq_stacked, quantize_here

    W, gram = layer_gram
    spec = QuantSpec.parse("int4_g32:gptq")
    ref = quantize_weight(W, spec, gram)
    got = quantize_here("down", W.cuda(), spec, gram.cuda())
    _close_codes_loose(got.codes.cpu(), ref.codes, "quantize_here")
    e_ref = output_error(W, ref.dequantize().float(), gram)
    assert output_error(W, got.dequantize().float().cpu(), gram) == pytest.approx(e_ref, rel=0.02)
    two = gptq_stacked(["a", "b"], [W.cuda(), W.cuda()], spec, gram.cuda())
    for q in two:  # cuBLAS may pick another split for 2N rows: equal up to GPTQ's rounding drift
        _close_codes_loose(q.codes.cpu(), got.codes.cpu(), "stacked")


def test_a_kernel_that_fails_on_its_first_block_falls_back_loudly(layer_gram, monkeypatch):
    """A column kernel that cannot compile or launch: a warning, the torch loop's exact result, and
    info["column_loop"] saying so."""
    import workbench.kernels.gptq_block as KB

    def broken(*args, **kw):
        raise RuntimeError("no such device function\nsecond line")

    W, gram = layer_gram
    sp = QuantSpec.parse("int4_g32")
    ref = gptq_quantize(W, sp, gram, column_kernel=False)
    monkeypatch.setattr(KB, "gptq_block", broken)
    with pytest.warns(UserWarning, match="column kernel failed"):
        got = gptq_quantize(W, sp, gram, column_kernel=True)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert got[3]["column_loop"].startswith("torch (kernel failed: RuntimeError: no such device function")
    assert ref[3]["column_loop"] == "torch"
