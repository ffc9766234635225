"""Weight statistics against direct computations, and grid levels against the quant core's own rounding."""

from __future__ import annotations

import pytest
import scipy.stats
import torch

from workbench.errors import WorkbenchError
from workbench.model.inventory import get_linear_weight
from workbench.quant.api import fake_quant
from workbench.quant.formats import grouped
from workbench.quant.spec import QuantSpec
from workbench.stats.weights import grid_levels, weight_stats


def _heavy(N=96, K=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.02
    W[3, 17] = 0.9  # one huge outlier weight
    W[:, 5] *= 8  # one loud input channel
    return W


def test_moments_and_tails_match_direct():
    W = _heavy()
    st = weight_stats(W, 6.0, name="x", group_size=64)
    w = W.double().flatten()
    assert st.min == float(W.min()) and st.max == float(W.max())
    assert st.mean == pytest.approx(float(w.mean()), rel=1e-6, abs=1e-12)
    assert st.std == pytest.approx(float(w.std(unbiased=False)), rel=1e-6)
    assert st.kurtosis == pytest.approx(float(scipy.stats.kurtosis(w.numpy(), fisher=True)), rel=1e-5)
    assert st.kurtosis > 10  # the outliers make the tails heavy
    direct = float(((w - w.mean()).abs() > 6 * w.std(unbiased=False)).double().mean())
    assert st.frac_beyond_k_sigma == pytest.approx(direct, abs=1e-12) and direct > 0
    assert torch.equal(st.absmax_out, W.abs().amax(1)) and torch.equal(st.absmax_in, W.abs().amax(0))
    assert int(st.absmax_in.argmax()) in (5, 17)
    # group ranges: K=200, G=64 -> groups of 64, 64, 64, 8 columns
    ranges = torch.stack(
        [W[:, a:b].amax(1) - W[:, a:b].amin(1) for a, b in ((0, 64), (64, 128), (128, 192), (192, 200))], 1
    )
    assert st.group_range_quantiles["q100"] == pytest.approx(float(ranges.max()))
    assert st.group_range_quantiles["q0"] == pytest.approx(float(ranges.min()))


def test_histograms_count_every_weight_within_a_bin():
    W = _heavy(seed=1)
    st = weight_stats(W, name="x")
    assert st.hist_counts.sum() == W.numel() and st.log_counts.sum() == W.numel()
    assert st.hist_edges[0] == -W.abs().max() and st.hist_edges[-1] == W.abs().max()
    direct = torch.histogram(W.double().flatten(), bins=st.hist_edges)[0]
    # float rounding at an edge may move a value by one bin, never further
    assert (torch.cumsum(st.hist_counts, 0) - torch.cumsum(direct, 0)).abs().max() <= 2
    lg = torch.log2(W.abs().double().flatten()).clamp(float(st.log_edges[0]), float(st.log_edges[-1]) - 1e-9)
    direct_log = torch.histogram(lg, bins=st.log_edges)[0]
    assert (torch.cumsum(st.log_counts, 0) - torch.cumsum(direct_log, 0)).abs().max() <= 2


@pytest.mark.parametrize(
    "spec", ["int4_g64", "int3_g32_sym", "int8_ch", "fp8_e4m3", "nvfp4", "mxfp4", "nf4_g64"]
)
def test_grid_levels_hold_every_quantized_value_of_their_group(spec):
    W = _heavy(N=64, K=256, seed=2)
    q = QuantSpec.parse(spec)
    g = grid_levels(W, q)
    n_codes = 2**q.bits
    assert 2 <= g.levels.numel() <= n_codes and torch.all(g.levels[1:] > g.levels[:-1])
    Wq = grouped(fake_quant(W, q), q)  # [R, n_groups, G]
    vals = Wq[g.row, g.group]
    assert torch.isin(vals, g.levels).all(), f"{spec}: a quantized value is not on the grid"
    if q.fmt == "int":  # evenly spaced by the group's scale
        torch.testing.assert_close(g.levels[1:] - g.levels[:-1], torch.full((n_codes - 1,), g.scale))


def test_grid_choice_median_max_min():
    W = _heavy(N=64, K=256, seed=3)
    gmed, gmax, gmin = (grid_levels(W, "int4_g64", which=w) for w in ("median", "max", "min"))
    assert gmin.scale <= gmed.scale <= gmax.scale and gmin.scale < gmax.scale
    assert gmax.row == 3  # the row holding the 0.9 outlier has the widest group
    with pytest.raises(WorkbenchError, match="no grid"):
        grid_levels(W, "bf16")


def test_real_layer_stats_and_specs(stories):
    W = get_linear_weight(stories.model.get_submodule("model.layers.1.mlp.down_proj"))
    st = weight_stats(W, name="down", specs=["int4_g128", "bf16", "nvfp4"])
    assert set(st.grids) == {"int4_g128", "nvfp4"}  # bf16 has no grid
    assert st.shape == (64, 172) and st.group_size == 128
    with pytest.raises(WorkbenchError, match="layer 'bad'"):
        weight_stats(torch.full((2, 2), float("nan")), name="bad")
