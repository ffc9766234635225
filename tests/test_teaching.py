"""workbench.teaching.lessons and workbench.ui.teaching_charts on real stories260K weights and activations."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.model.inventory import get_linear_weight
from workbench.quant.api import fake_quant
from workbench.quant.formats_float import NF4_LEVELS
from workbench.quant.spec import QuantSpec
from workbench.teaching import lessons as teaching

DOWN = "model.layers.2.mlp.down_proj"  # [64, 172]: K not a multiple of 32 / 64 / 128


@pytest.fixture(scope="module")
def W(stories) -> torch.Tensor:
    return get_linear_weight(stories.model.get_submodule(DOWN)).detach().float().clone()


@pytest.mark.parametrize(
    "args,expected",
    [
        (("int", 3, 64), "int3_g64"),
        (("int_sym", 8, "ch"), "int8_ch_sym"),
        (("int", 4, "t"), "int4_t"),
        (("nf4", 4, 32), "nf4_g32"),
        (("fp4_e2m1", 2, 16), "fp4_e2m1_g16"),
        (("mxfp4", 3, 16), "mxfp4"),
        (("fp8_e4m3", 8, 128), "fp8_e4m3"),
        (("fp8_e5m2", 8, "t"), "fp8_e5m2_t"),
    ],
)
def test_spec_for_gives_canonical_specs(args, expected):
    assert teaching.spec_for(*args) == expected


@pytest.mark.parametrize("args", [("nf4", 4, "ch"), ("int", 9, 32), ("int", 4, 8), ("float", 4, 32)])
def test_spec_for_refuses_impossible_choices(args):
    with pytest.raises(WorkbenchError):
        teaching.spec_for(*args)


@pytest.mark.parametrize("spec", ["int4_g32", "int3_g64_sym", "int2_ch"])
def test_walk_through_follows_the_integer_formula(W, spec):
    q = QuantSpec.parse(spec)
    walk = teaching.walk_through_group(W, spec, row=5, group=1 if q.granularity == "group" else 0)
    expected = (walk.codes.float() - walk.zero) * walk.scale
    assert torch.equal(walk.dequantized, expected)
    assert torch.equal(walk.values, W[5, walk.columns[0] : walk.columns[1]])
    if not q.symmetric:  # asymmetric ranges cover the group: no clipping (symmetric codes stop at 2^(b-1)-1)
        assert walk.max_error <= walk.scale / 2 * (1 + 1e-6)
    assert int(walk.codes.max()) <= 2**q.bits - 1
    assert len(walk.rows(3)) == 3 and walk.rows()[0]["column"] == walk.columns[0]


def test_walk_through_last_group_is_shorter_and_bad_cells_are_refused(W):
    walk = teaching.walk_through_group(W, "int4_g64", row=0, group=2)
    assert walk.columns == (128, 172) and len(walk.values) == 44
    with pytest.raises(WorkbenchError, match="group 3"):
        teaching.walk_through_group(W, "int4_g64", row=0, group=3)
    with pytest.raises(WorkbenchError, match="row 64"):
        teaching.walk_through_group(W, "int4_g64", row=64, group=0)


def test_spec_sweep_error_falls_with_bits_at_about_6_db_per_bit(W):
    rows = teaching.spec_sweep(W, [f"int{b}_g32" for b in range(2, 9)])
    sqnr = [r["sqnr_db"] for r in rows]
    assert all(b > a for a, b in zip(sqnr, sqnr[1:])), sqnr
    for r in rows:
        assert r["rel_mse"] == pytest.approx(10 ** (-r["sqnr_db"] / 10), rel=1e-9)
        assert r["bits_per_weight"] == QuantSpec.parse(r["spec"]).bits_per_weight(
            out_features=64, in_features=172
        )
    assert 5.0 < teaching.sqnr_slope(rows) < 7.5


def test_spec_sweep_output_error_uses_the_gram(W):
    X = torch.randn(300, 172, generator=torch.Generator().manual_seed(0))
    gram = (X.T.double() @ X.double()).float()
    row = teaching.spec_sweep(W, ["int3_g32"], gram)[0]
    D = W - fake_quant(W, "int3_g32")
    direct = float(((X @ D.T) ** 2).sum() / ((X @ W.T) ** 2).sum())
    assert row["output_error"] == pytest.approx(direct, rel=1e-3)


def test_sqnr_slope_is_the_least_squares_slope():
    rows = [{"spec": f"int{b}_g32", "sqnr_db": 1.5 * b + 2.0} for b in (2, 3, 5)]
    assert teaching.sqnr_slope(rows) == pytest.approx(1.5)
    with pytest.raises(WorkbenchError):
        teaching.sqnr_slope(rows[:1])


@pytest.mark.parametrize(
    "spec,n_levels",
    [("int4_g32", 16), ("int3_ch_sym", 8), ("nf4_g64", 16), ("fp4_e2m1_g32", 15), ("mxfp4", 15)],
)
def test_group_levels_contain_every_dequantized_value(W, spec, n_levels):
    levels = teaching.group_levels(W, spec, row=3, group=0)
    assert levels.numel() == n_levels
    walk = teaching.walk_through_group(W, spec, row=3, group=0)
    assert torch.isin(walk.dequantized, levels).all()
    if spec == "nf4_g64":
        assert torch.allclose(levels, torch.tensor(NF4_LEVELS) * walk.scale)
    if spec.startswith("int"):
        steps = levels.diff()
        assert torch.allclose(steps, torch.full_like(steps, walk.scale))


def test_row_view_marks_group_starts_and_matches_the_sweep(W):
    view = teaching.row_view(W, "int4_g32", row=7, max_columns=100, start=20)
    assert view.columns == range(20, 120) and view.boundaries == [32, 64, 96]
    assert view.weights == W[7, 20:120].tolist()
    assert view.sqnr_db == teaching.spec_sweep(W, ["int4_g32"])[0]["sqnr_db"]
    assert teaching.row_view(W, "int4_ch", row=0).boundaries == []


def test_distinct_values_per_group_sees_a_4_bit_grid(W):
    before = teaching.distinct_values_per_group(W, 32)
    after = teaching.distinct_values_per_group(fake_quant(W, "int4_g32"), 32)
    assert len(after) == 64 * (172 // 32)
    assert max(after) <= 16 < max(before)


def test_a_planted_outlier_is_found_and_hurts_its_neighbours(W):
    Wo = W.clone()
    Wo[10, 70] = 40 * float(W.abs().max())
    row, group, ratio = teaching.most_outlying_group(Wo, 32)
    assert (row, group) == (10, 2) and ratio > 100
    eff = teaching.outlier_effect(Wo, "int4_g32", row, group)
    assert eff.outlier_column == 70 and eff.outlier_value == Wo[10, 70]
    assert eff.levels_used_with < eff.levels_used_without
    assert eff.error_ratio > 5


def test_weight_outlier_table_matches_direct_moments(stories):
    names = [DOWN, "lm_head"]
    rows = teaching.weight_outlier_table(stories.model, names)
    for r, name in zip(rows, names):
        w = get_linear_weight(stories.model.get_submodule(name)).detach().double().flatten()
        z = (w - w.mean()) / w.std(unbiased=False)
        assert r["absmax_over_std"] == pytest.approx(float(w.abs().max() / w.std(unbiased=False)), rel=1e-6)
        assert r["excess_kurtosis"] == pytest.approx(float((z**4).mean() - 3), rel=1e-6, abs=1e-9)
        assert r["beyond_k_sigma"] == float((z.abs() > 6).double().mean())
    assert rows[0]["role"] == "down" and rows[0]["block"] == 2 and rows[1]["block"] is None
    with pytest.raises(WorkbenchError, match="nope"):
        teaching.weight_outlier_table(stories.model, ["nope"])


def test_activation_tables_agree_with_the_statistics(stories):
    from workbench.model.data import load_text, tokenize_text
    from workbench.stats.activations import collect_activation_stats

    # a slice of the text: the llama2.c tokenizer's pure-Python BPE is slow on the whole file
    batches = tokenize_text(stories.tokenizer, load_text("tinystories")[:3000])[:128].reshape(2, 64)
    names = ["model.layers.0.self_attn.q_proj", DOWN]
    stats = collect_activation_stats(stories.model, batches, names, gram=False, progress=False)
    act = teaching.activation_outlier_table(stats, top=2)
    mass = teaching.massive_activation_table(stats, stories.tokenizer)
    for a, m, name in zip(act, mass, names):
        st = stats[name]
        assert a["top_channels"][0] == int(st.absmax.argmax()) and len(a["top_channels"]) == 2
        assert a["ratio_to_median"] == pytest.approx(float(st.absmax.max() / st.absmax.median()))
        assert m["max_abs"] == pytest.approx(float(st.absmax.max()))  # the top token holds the top value
        assert m["ratio"] == pytest.approx(m["max_abs"] / st.token_max.median())
        assert isinstance(m["token"], str) and 0 <= m["position"] < 64


def test_explorer_figures_and_refusals(W):
    pytest.importorskip("plotly")
    from workbench.ui import teaching_charts as tc

    figs = tc.explorer_figures(W, "int", 3, 32, row=4, column=100, width=64)
    assert len(figs) == 2
    row_fig, hist = figs
    assert list(row_fig.data[0].x) == list(range(68, 132))
    assert len(row_fig.layout.shapes) == 2  # group starts 96 and 128 inside columns 68..131
    levels = teaching.group_levels(W, "int3_g32", 4, 3)
    assert f"{levels.numel()} levels" in hist.layout.title.text
    bad = tc.explorer_figures(W, "nf4", 4, "ch")
    assert "choose a group size" in bad[0].layout.annotations[0].text
    sweep = tc.sweep_figure(
        teaching.spec_sweep(W, ["int2_g32", "int4_g32"]), x="bits_per_weight", y="sqnr_db", title="t"
    )
    assert list(sweep.data[0].text) == ["int2_g32", "int4_g32"] and not math.isnan(sweep.data[0].y[0])
