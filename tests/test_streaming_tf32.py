"""The GPU streaming paths' reduced-precision arithmetic against float64, on stories260K's real activations.

- Grams: the CUDA accumulator multiplies bf16 inputs exactly and accumulates in float32
  (`stats.accumulator`); the float64 Gram of the same bf16 values differs by < 1e-5 relative (Frobenius;
  observed 2e-7 on the CPU emulation, 256 tokens), the proxy costs built from either Gram by < 1e-4
  relative (observed 3e-7).
- Proxy: the streamed scan's quadratic forms D G D^T run in TF32 on CUDA (`devicequant.proxy_costs_tensor`);
  every cost stays within 1e-2 relative of the float64 formula (observed 5e-5 with emulated TF32). On the
  CPU the TF32 products are emulated (inputs rounded to 10 mantissa bits, float32 accumulation); on CUDA
  the real TF32 path runs, and `exact=True` gives the float32 numbers (within 1e-2 too).
"""

from __future__ import annotations

import pytest
import torch

from workbench.measure.sensitivity import proxy_costs
from workbench.quant.api import fake_quant

CUDA = torch.cuda.is_available()
SPECS = ["int2_g64", "int3_g32", "int4_g32", "int8_ch", "nvfp4", "fp8_e4m3"]
LAYERS = ["model.layers.2.self_attn.q_proj", "model.layers.4.mlp.down_proj"]


@pytest.fixture(scope="module")
def inputs(stories):
    """The real input rows [T, K] of LAYERS on 4 x 64 calibration tokens (float32)."""
    from workbench.model.data import calibration_batches

    ids = calibration_batches(
        stories.tokenizer, "wiki", 4, 64, 0, max_context=stories.description.max_context
    )
    got: dict[str, list[torch.Tensor]] = {n: [] for n in LAYERS}
    hooks = [
        stories.model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: got[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).float())
        )
        for n in LAYERS
    ]
    try:
        with torch.no_grad():
            stories.model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest TF32 value (10 mantissa bits), as float32."""
    b = x.float().contiguous().view(torch.int32)
    return ((b + 0x1000) & ~0x1FFF).view(torch.float32)


def _costs64(W: torch.Tensor, G: torch.Tensor, specs) -> dict[str, float]:
    W, G = W.double(), G.double()
    den = float(((W @ G) * W).sum())
    out = {}
    for s in specs:
        D = W - fake_quant(W.float(), s, None).double()
        out[s] = float(((D @ G) * D).sum()) / den
    return out


def _costs_tf32_emulated(W: torch.Tensor, G: torch.Tensor, specs) -> dict[str, float]:
    Gt = _tf32(G)
    den = float(((_tf32(W) @ Gt).double() * W.double()).sum())
    out = {}
    for s in specs:
        D = W.float() - fake_quant(W.float(), s, None)
        out[s] = float(((_tf32(D) @ Gt).double() * D.double()).sum()) / den
    return out


@pytest.mark.parametrize("name", LAYERS)
def test_gram_of_bf16_inputs_with_float32_accumulation(stories, inputs, name):
    from workbench.stats.accumulator import InputAccumulator

    x = inputs[name].to(torch.bfloat16)
    exact = x.double().T @ x.double()
    if CUDA:
        acc = InputAccumulator(x.shape[1], hist_bins=16)
        acc.add(x[:100].cuda())  # two updates: the second adds to (not overwrites) the first
        acc.add(x[100:].cuda())
        g32 = acc.result(name).gram  # float64 copy of the float32 device accumulation
    else:
        g32 = (x.float().T @ x.float()).double()  # exact bf16 products, float32 accumulation
    rel = float((g32 - exact).norm() / exact.norm())
    assert 0 <= rel < 1e-5, f"{name}: Gram relative error {rel:.2e}"
    W = stories.model.get_submodule(name).weight.detach().float()
    a, b = proxy_costs(W, exact, SPECS), proxy_costs(W, g32, SPECS)
    for s in SPECS:
        assert b[s] == pytest.approx(a[s], rel=1e-4), (name, s)


@pytest.mark.parametrize("name", LAYERS)
def test_tf32_proxy_costs_stay_within_1e_2_of_float64(stories, inputs, name):
    from workbench.streaming.devicequant import proxy_costs_tensor

    W = stories.model.get_submodule(name).weight.detach().float()
    x = inputs[name]
    G = x.double().T @ x.double()
    ref = _costs64(W, G, SPECS)
    if CUDA:
        t = proxy_costs_tensor(W.cuda(), G.float().cuda(), SPECS, name).tolist()
        e = proxy_costs_tensor(W.cuda(), G.float().cuda(), SPECS, name, exact=True).tolist()
        got, fp32 = dict(zip(SPECS, t)), dict(zip(SPECS, e))
        for s in SPECS:  # device RTN: a float8 code may differ by one from the CPU's
            assert fp32[s] == pytest.approx(ref[s], rel=1e-2), (name, s)
    else:
        got = _costs_tf32_emulated(W, G.float(), SPECS)
    for s in SPECS:
        assert got[s] == pytest.approx(ref[s], rel=1e-2), (name, s, got[s], ref[s])
    assert got["int2_g64"] > got["int4_g32"] > got["int8_ch"] > 0
