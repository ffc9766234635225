"""workbench.measure.layer_report (the Distributions tab's numbers) on a real stories260K layer."""

from __future__ import annotations

import pytest
import torch

from workbench.measure.layer_report import layer_report, outlier_mask, spec_errors
from workbench.model.inventory import get_linear_weight, get_module
from workbench.quant.api import fake_quant
from workbench.quant.metrics import gram_from_inputs
from workbench.stats.weights import grid_levels

LAYER = "model.layers.1.mlp.down_proj"


def test_outlier_mask_is_relative_to_the_median():
    absmax = torch.tensor([1.0, 1.0, 1.0, 3.9, 4.1, 10.0])
    assert outlier_mask(absmax, ratio=4.0).tolist() == [False, False, False, False, True, True]


def test_report_weights_grid_and_errors(stories):
    specs = ["int8_ch", "int4_g32", "int3_g32", "int2_g32", "nvfp4"]
    r = layer_report(stories, LAYER, "int4_g32", specs)
    W = get_linear_weight(get_module(stories.model, LAYER)).detach().float()
    assert r.shape == (64, 172) and r.activations is None
    assert int(r.weights.hist_counts.sum()) == W.numel()
    assert torch.equal(r.weights.absmax_out, W.abs().amax(1))
    assert torch.equal(r.grid.levels, grid_levels(W, "int4_g32").levels) and r.grid.levels.numel() == 16
    sq = {e.spec: e.sqnr_db for e in r.errors}
    assert sq["int8_ch"] > sq["int4_g32"] > sq["int3_g32"] > sq["int2_g32"]
    assert sq["int4_g32"] > 18 and all(e.output_error is None for e in r.errors)
    assert r.out_outliers.shape == (64,) and r.in_outliers.shape == (172,)


def test_gram_errors_and_algorithms_need_a_gram(stories):
    W = get_linear_weight(get_module(stories.model, LAYER)).detach().float()
    X = torch.randn(2048, 172, generator=torch.Generator().manual_seed(0))
    X[:, 5] *= 30  # one outlier input channel
    G = gram_from_inputs(X)
    no_gram = spec_errors(W, ["int4_g32", "int3_g64:gptq"])
    assert [e.spec for e in no_gram] == ["int4_g32"]  # gptq skipped without calibration
    with_gram = {e.spec: e for e in spec_errors(W, ["int3_g64", "int3_g64:gptq"], gram=G)}
    W_hat = fake_quant(W, "int3_g64")
    direct = float(((X @ W.T - X @ W_hat.T) ** 2).sum() / ((X @ W.T) ** 2).sum())
    assert with_gram["int3_g64"].output_error == pytest.approx(direct, rel=1e-3)
    assert with_gram["int3_g64:gptq"].output_error <= with_gram["int3_g64"].output_error
    assert 0 < with_gram["int3_g64"].output_error < 0.2


def test_unknown_layer_is_named(stories):
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match="model.layers.9.mlp.down_proj"):
        layer_report(stories, "model.layers.9.mlp.down_proj", None, ["int8_ch"])
