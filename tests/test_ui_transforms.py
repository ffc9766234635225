"""The Transforms tab: a layer's input before / after a transform (core, chart, state, view), stories260K."""

from __future__ import annotations

import pytest

from workbench.errors import WorkbenchError
from workbench.transform.compare import compare_transform
from workbench.ui.transform_charts import input_comparison_figure

LAYER = "model.layers.3.mlp.down_proj"
KW = dict(text="tinystories", n_seqs=2, seq_len=64)


@pytest.fixture(scope="module")
def comparison(stories):
    return compare_transform(stories, LAYER, "hadamard residual + down", **KW)


def test_rotation_spreads_the_input_and_the_numbers_match_the_outlier_statistics(stories, comparison):
    from workbench.model.data import calibration_batches
    from workbench.stats.outliers import input_outliers

    b, a = comparison.before, comparison.after
    K = stories.model.config.intermediate_size  # down_proj's input width (172 on stories260K)
    assert comparison.n_tokens == 128 and len(b.channel_absmax) == len(a.channel_absmax) == K
    assert sum(b.counts) == sum(a.counts) == 128 * K
    assert a.stats.kurtosis < b.stats.kurtosis and a.stats.max_median < b.stats.max_median
    batches = calibration_batches(stories.tokenizer, "tinystories", 2, 64, 0, stories.description.max_context)
    ref = input_outliers(stories.model, [LAYER], batches)[LAYER]
    assert b.stats.kurtosis == pytest.approx(ref.kurtosis, rel=1e-9)  # the `workbench outliers` numbers
    assert max(b.channel_absmax) == pytest.approx(ref.absmax, rel=1e-6)


def test_chart_puts_before_and_after_side_by_side(comparison):
    fig = input_comparison_figure(comparison)
    assert len(fig.data) == 4 and [t.type for t in fig.data] == ["scatter", "bar", "scatter", "bar"]
    titles = [a.text for a in fig.layout.annotations]
    assert f"{comparison.before.stats.kurtosis:,.1f}" in titles[0] and titles[1].startswith("after hadamard")
    assert list(fig.data[2].y) == comparison.after.channel_absmax


def test_bad_layer_or_preset_is_refused_by_name(stories):
    with pytest.raises(WorkbenchError, match="layer 'nope' is not a quantizable linear"):
        compare_transform(stories, "nope", "hadamard down", **KW)
    with pytest.raises(WorkbenchError, match="unknown transform preset 'spin'"):
        compare_transform(stories, LAYER, "spin", **KW)


def test_state_runs_the_comparison_in_a_job_and_the_view_draws_it(stories):
    from workbench.ui.state import WorkbenchState
    from workbench.ui.transform_state import TransformCompare
    from workbench.ui.views.transforms_view import TransformsView

    state = WorkbenchState()
    state.set_model(stories)
    cmp = TransformCompare(state=state)
    job = cmp.run(LAYER, "hadamard down", wait=True, **KW)
    assert job.state == "done" and cmp.result.after.stats.max_median < cmp.result.before.stats.max_median
    panel = TransformsView(state=state).panel()
    assert panel.name == "Transforms"
