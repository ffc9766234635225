"""Format primitives: FP8 exact vs torch, E2M1 / MXFP4 / NVFP4 / NF4 grids, integer layout, errors."""

import itertools

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.quant.api import fake_quant, quantize_weight
from workbench.quant.formats_float import (
    E2M1,
    E4M3,
    E5M2,
    NF4_LEVELS,
    minifloat_decode,
    minifloat_encode,
    minifloat_round,
)
from workbench.quant.metrics import sqnr_db
from workbench.quant.spec import QuantSpec

FP8 = [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)]


def _weights(N=48, K=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.05


@pytest.mark.parametrize("fmt,dtype", FP8, ids=["e4m3", "e5m2"])
def test_fp8_matches_torch_on_every_representable_value(fmt, dtype):
    patterns = torch.arange(256, dtype=torch.uint8)
    torch_vals = patterns.view(dtype).float()
    finite = torch.isfinite(torch_vals)
    assert torch.equal(minifloat_decode(patterns, fmt)[finite], torch_vals[finite])
    vals = torch_vals[finite]
    assert torch.equal(minifloat_round(vals, fmt), vals)
    assert torch.equal(minifloat_encode(vals, fmt), vals.to(dtype).view(torch.uint8))


@pytest.mark.parametrize("fmt,dtype", FP8, ids=["e4m3", "e5m2"])
def test_fp8_rounding_matches_torch_cast_including_ties(fmt, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, generator=g) * torch.exp(torch.randn(200_000, generator=g) * 4)
    x = x.clamp(-fmt.max_value, fmt.max_value)
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[torch.isfinite(grid)].unique()
    ties = (grid[1:] + grid[:-1]) / 2  # exact midpoints: round half to even
    for v in (x, ties):
        assert torch.equal(minifloat_encode(v, fmt), v.to(dtype).view(torch.uint8))
        assert torch.equal(minifloat_round(v, fmt), v.to(dtype).float())


def test_e2m1_grid_and_ties_to_even():
    assert minifloat_decode(torch.arange(8, dtype=torch.uint8), E2M1).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -5.0, 100.0])
    assert minifloat_round(x, E2M1).tolist() == [0, 1, 1, 2, 2, 4, 4, 6, -4, 6]
    assert minifloat_encode(torch.tensor([-6.0, -0.5]), E2M1).tolist() == [0b1111, 0b1001]


def test_fp8_layer_quantization_codes_are_torch_fp8():
    W = _weights()
    for spec, dtype in [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2_t", torch.float8_e5m2)]:
        q = quantize_weight(W, spec)
        scaled = W / q.scales  # [N, 1] or [1, 1] broadcast
        assert torch.equal(q.codes, scaled.to(dtype).view(torch.uint8))
        assert torch.equal(q.dequantize(), scaled.to(dtype).float() * q.scales)


def test_mxfp4_scales_follow_the_ocp_rule():
    W = _weights(16, 96)
    q = quantize_weight(W, "mxfp4")
    assert q.scales.shape == (16, 3)
    amax = W.reshape(16, 3, 32).abs().amax(-1)
    assert torch.equal(q.scales, torch.exp2(torch.floor(torch.log2(amax)) - 2))
    vals = minifloat_decode(q.codes, E2M1).reshape(16, 3, 32)
    assert torch.equal(q.dequantize().reshape(16, 3, 32), vals * q.scales.unsqueeze(-1))


def test_nvfp4_scales_are_e4m3_with_fp32_tensor_scale():
    W = _weights(16, 72)  # 4.5 blocks of 16: a short last block
    q = quantize_weight(W, "nvfp4")
    assert q.scales.shape == (16, 5)
    assert torch.equal(q.tensor_scale, W.abs().max() / (448 * 6))
    assert torch.equal(minifloat_round(q.scales, E4M3), q.scales) and q.scales.max() <= 448
    assert q.scales.max() == 448  # the block holding the global absmax
    assert sqnr_db(W, q.dequantize()) > 17.0


def test_nf4_values_are_levels_times_fp16_absmax():
    W = _weights(8, 130)
    q = quantize_weight(W, "nf4_g64")
    assert q.scales.shape == (8, 3)
    assert torch.equal(q.scales[:, :2], W[:, :128].reshape(8, 2, 64).abs().amax(-1).half().float())
    levels = torch.tensor(NF4_LEVELS)
    Wh = q.dequantize()
    idx = torch.arange(130) // 64
    assert int(q.codes.max()) <= 15
    assert torch.equal(Wh, levels[q.codes.long()] * q.scales[:, idx])
    # nearest level: no other level is closer to W / absmax
    x = W / q.scales[:, idx]
    chosen = (x - levels[q.codes.long()]).abs()
    assert (chosen <= (x.unsqueeze(-1) - levels).abs().amin(-1) + 1e-6).all()
    assert torch.equal(q.scales[:, 2], W[:, 128:].abs().amax(-1).half().float())


@pytest.mark.parametrize(
    "bits,gran,sym",
    list(itertools.product([2, 3, 4, 8], ["g32", "g64", "ch", "t"], [False, True])),
    ids=lambda v: str(v),
)
def test_integer_layout_and_error_bound(bits, gran, sym):
    spec = QuantSpec.parse(f"int{bits}_{gran}{'_sym' if sym else ''}")
    W = _weights(12, 200)  # 200 = 3 * 64 + 8: short last group
    q = quantize_weight(W, spec)
    N, K = W.shape
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (N, K) and int(q.codes.max()) < 2**bits
    ng = spec.n_groups(K)
    assert q.scales.shape == ((1, 1) if gran == "t" else (N, ng))
    assert (q.zeros is None) == sym
    assert torch.equal(q.scales, q.scales.half().float())  # fp16-exact scales
    # the documented dequantization formula, by hand
    col_group = torch.arange(K) // spec.group_size if spec.granularity == "group" else torch.zeros(K).long()
    s = q.scales[:, col_group] if gran != "t" else q.scales
    z = 2 ** (bits - 1) if sym else (q.zeros[:, col_group] if gran != "t" else q.zeros)
    assert torch.equal(q.dequantize(), (q.codes.float() - z) * s)
    if not sym:  # asymmetric: half a step, plus the grid end shift from rounding the scale to fp16
        assert ((W - q.dequantize()).abs() <= s * (0.5 + (2**bits - 1) * 2.0**-11) + 1e-9).all()


@pytest.mark.parametrize(
    "spec,min_db",
    [
        ("int8_ch", 40),
        ("int4_g32", 19),
        ("int4_g128", 17.5),
        ("int3_g64", 12.5),
        ("int2_g32", 6.5),
        ("fp8_e4m3", 30),
        ("fp8_e5m2", 24),
        ("fp4_e2m1_g32", 18),
        ("mxfp4", 16.5),
        ("nvfp4", 18),
        ("nf4_g64", 19),
    ],
)
def test_sqnr_on_gaussian_weights(spec, min_db):
    W = _weights(64, 576, seed=3)
    assert sqnr_db(W, fake_quant(W, spec)) > min_db


def test_clipping_never_increases_weight_error():
    W = _weights(32, 200, seed=4)
    W[0, 0] = 1.0  # an outlier that clipping can trade off
    for spec in ["int3_g64", "int4_ch_sym", "int2_t", "nf4_g64", "fp4_e2m1_g32", "nvfp4"]:
        base = sqnr_db(W, fake_quant(W, spec))
        clipped = sqnr_db(W, fake_quant(W, spec, clip=True))
        assert clipped >= base - 1e-9, spec
    assert sqnr_db(W, fake_quant(W, "int3_g64", clip=True)) > sqnr_db(W, fake_quant(W, "int3_g64")) + 0.1


def test_zero_weight_quantizes_to_zero():
    W = torch.zeros(4, 40)
    for spec in ["int4_g16", "int3_t_sym", "fp8_e4m3", "mxfp4", "nvfp4", "nf4_g16", "fp4_e2m1_g16"]:
        assert torch.equal(fake_quant(W, spec), W), spec


def test_high_precision_specs():
    W = _weights(4, 8)
    assert torch.equal(fake_quant(W, "bf16"), W.bfloat16().float())
    assert torch.equal(fake_quant(W, "fp16"), W.half().float())
    with pytest.raises(WorkbenchError, match="keeps layer 'x' in high precision"):
        quantize_weight(W, "bf16", layer="x")


def test_bad_inputs_name_the_layer():
    W = _weights(8, 32)
    bad = W.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(WorkbenchError, match="NaN or inf in the weights of layer 'blk.3.q'"):
        quantize_weight(bad, "int4_g16", layer="blk.3.q")
    gram = torch.eye(32)
    gram[0, 0] = float("inf")
    with pytest.raises(WorkbenchError, match="NaN or inf in the calibration inputs .* layer 'blk.3.q'"):
        quantize_weight(W, "int4_g16:gptq", gram, layer="blk.3.q")
    with pytest.raises(WorkbenchError, match="needs calibration statistics"):
        quantize_weight(W, "int4_g16:awq", layer="blk.3.q")
    with pytest.raises(WorkbenchError, match=r"Gram matrix has shape \(16, 16\), expected \[32, 32\]"):
        quantize_weight(W, "int4_g16:gptq", torch.eye(16), layer="blk.3.q")
    with pytest.raises(WorkbenchError, match="bits 9 outside"):
        quantize_weight(W, "int9_g16")
