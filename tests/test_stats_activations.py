"""Activation statistics: streaming results against a direct computation on stored activations, layerwise
mode against full mode, shared inputs, hooks removed on errors."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import DATA
from workbench.model.data import calibration_batches
from workbench.stats.activations import ActivationCollector, collect_activation_stats
from workbench.stats.histogram import StreamingHistogram


@pytest.fixture(scope="module")
def story_batches(stories, tmp_path_factory):
    # the llama2.c tokenizer is slow on long texts: a few kB of TinyStories is plenty for 6 x 64 tokens
    text = (DATA / "calibration" / "tinystories.txt").read_text()[:4000]
    path = tmp_path_factory.mktemp("txt") / "stories.txt"
    path.write_text(text)
    return calibration_batches(stories.tokenizer, str(path), n_seqs=6, seq_len=64, seed=1)


def _stored_inputs(model, batches, names):
    """Every input of every layer, concatenated [T, K] (the direct reference)."""
    store = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: store[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            for i in range(batches.shape[0]):
                model(input_ids=batches[i : i + 1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def test_streaming_matches_direct(stories, story_batches):
    model = stories.model
    stats = collect_activation_stats(model, story_batches, progress=False)
    X = _stored_inputs(model, story_batches, list(stats))
    for name, st in stats.items():
        x = X[name].double()
        assert st.n_tokens == x.shape[0] == story_batches.numel()
        assert torch.equal(st.absmax, X[name].abs().amax(0)), name  # exact
        torch.testing.assert_close(st.gram, x.T @ x, rtol=1e-12, atol=1e-9)  # float64 accumulation
        torch.testing.assert_close(st.mean, x.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st.rms, x.pow(2).mean(0).sqrt(), rtol=1e-12, atol=1e-12)
        # histogram: same total, and every value within one bin width of where a direct binning puts it
        direct = torch.histogram(x.flatten(), bins=st.hist_edges)[0]
        assert st.hist_counts.sum() == x.numel()
        width = float(st.hist_edges[1] - st.hist_edges[0])
        cdf_s, cdf_d = torch.cumsum(st.hist_counts, 0), torch.cumsum(direct, 0)
        shifted = torch.cat([torch.zeros(1, dtype=cdf_d.dtype), cdf_d[:-1]])
        assert torch.all(cdf_s >= shifted) and torch.all(cdf_s <= torch.cat([cdf_d[1:], cdf_d[-1:]])), name
        assert float(st.hist_edges[-1]) >= float(x.abs().max()) > float(st.hist_edges[-1]) / 2 - width
        # massive activations: the top token is the true per-token maximum, with its token id
        tmax, tch = X[name].abs().max(1)
        top = int(tmax.argmax())
        assert float(st.token_max.values[0]) == float(tmax[top])
        assert int(st.token_max.channels[0]) == int(tch[top])
        L = story_batches.shape[1]
        seq, pos = int(st.token_max.seqs[0]), int(st.token_max.positions[0])
        assert X[name].abs()[seq * L + pos].max() == st.token_max.values[0]
        assert int(st.token_max.token_ids[0]) == int(story_batches[seq, pos])


def test_shared_inputs_computed_once(stories, story_batches):
    stats = collect_activation_stats(stories.model, story_batches[:2], progress=False)
    q, k, v = (stats[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
    assert q.shared_with is None and k.shared_with == q.name and v.shared_with == q.name
    assert k.gram is q.gram and v.absmax is q.absmax
    up = stats["model.layers.1.mlp.up_proj"]
    assert up.shared_with == "model.layers.1.mlp.gate_proj"
    assert stats["model.layers.1.mlp.down_proj"].shared_with is None
    assert stats["model.layers.1.self_attn.o_proj"].shared_with is None


def test_layerwise_equals_full(stories, story_batches):
    full = collect_activation_stats(stories.model, story_batches, progress=False)
    lw = collect_activation_stats(
        stories.model, story_batches, mode="layerwise", batch_size=4, progress=False
    )
    assert list(full) == list(lw)
    for name in full:
        a, b = full[name], lw[name]
        assert a.n_tokens == b.n_tokens and a.shared_with == b.shared_with
        torch.testing.assert_close(a.absmax, b.absmax, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.gram, b.gram, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(a.rms, b.rms, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.hist_edges, b.hist_edges)
        assert (a.hist_counts - b.hist_counts).abs().sum() <= 0.001 * a.hist_counts.sum()
        assert torch.equal(a.token_max.token_ids[:4], b.token_max.token_ids[:4])


def test_gram_sink_receives_grams_and_stats_drop_them(stories, story_batches):
    got = {}
    stats = collect_activation_stats(
        stories.model,
        story_batches[:2],
        mode="layerwise",
        progress=False,
        gram_sink=lambda n, g: got.__setitem__(n, g.clone()),
    )
    ref = collect_activation_stats(stories.model, story_batches[:2], progress=False)
    assert all(s.gram is None for s in stats.values())
    leaders = {n for n, s in ref.items() if s.shared_with is None}
    assert set(got) == leaders
    for n in leaders:
        torch.testing.assert_close(got[n], ref[n].gram, rtol=1e-5, atol=1e-4)


def _n_hooks(model):
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("mode", ["full", "layerwise"])
def test_hooks_removed_after_exception(stories, story_batches, exc, mode):
    model = stories.model
    before = _n_hooks(model)
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise exc("stop")

    h = model.get_submodule("model.layers.2.mlp.down_proj").register_forward_pre_hook(boom)
    try:
        with pytest.raises(exc):
            collect_activation_stats(model, story_batches, mode=mode, progress=False, batch_size=2)
    finally:
        h.remove()
    assert _n_hooks(model) == before
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_collector_context_removes_hooks(stories):
    model = stories.model
    before = _n_hooks(model)
    with pytest.raises(ValueError):
        with ActivationCollector(model, ["lm_head", "model.layers.0.mlp.down_proj"]):
            assert _n_hooks(model) == before + 2
            raise ValueError("x")
    assert _n_hooks(model) == before


def test_histogram_doubling_is_exact():
    torch.manual_seed(0)
    chunks = [torch.randn(1000) * s for s in (0.3, 1.0, 7.0, 0.01, 40.0)]
    h = StreamingHistogram(64)
    for c in chunks:
        h.add(c)
    edges, counts = h.result()
    amax = float(torch.cat(chunks).abs().max())
    assert edges[-1] / 2 < amax <= edges[-1] and math.log2(edges[-1]).is_integer()  # the final power of 2
    direct = torch.histogram(torch.cat(chunks).double(), bins=edges)[0]
    assert torch.equal(counts, direct)


def _state_bytes(acc):
    s = acc._state
    tensors = [v for v in s.values() if isinstance(v, torch.Tensor)] + list(s["top"])
    tensors += [s["hist"].counts, s["tmax_hist"].counts]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_accumulator_memory_does_not_grow_with_tokens():
    from workbench.stats.accumulator import InputAccumulator

    sizes = []
    for n_chunks in (1, 40):
        acc = InputAccumulator(48)
        for i in range(n_chunks):
            acc.add(
                torch.randn(2, 256, 48) * (i + 1), torch.arange(512), torch.arange(512), torch.arange(512)
            )
        sizes.append(_state_bytes(acc))
        assert acc.n_tokens == n_chunks * 512
    assert sizes[0] == sizes[1]


@pytest.mark.slow
def test_layerwise_equals_full_on_default(default_model):
    batches = calibration_batches(default_model.tokenizer, "wiki", n_seqs=2, seq_len=64, seed=0)
    full = collect_activation_stats(default_model.model, batches, progress=False)
    lw = collect_activation_stats(
        default_model.model, batches, mode="layerwise", batch_size=2, progress=False
    )
    assert list(full) == list(lw) and len(full) == 211
    for name in full:
        a, b = full[name], lw[name]
        assert a.shared_with == b.shared_with and a.n_tokens == b.n_tokens == 128
        torch.testing.assert_close(a.absmax, b.absmax, rtol=1e-4, atol=1e-5)
        scale = float(a.gram.abs().max())
        torch.testing.assert_close(a.gram, b.gram, rtol=1e-4, atol=1e-5 * scale)
        assert torch.equal(a.token_max.token_ids[:1], b.token_max.token_ids[:1])
