"""stats/gram.py: the Gram accumulated over the upper block triangle and mirrored equals X^T X (CPU in float64
and float32; on CUDA bf16 inputs with float32 accumulation, through InputAccumulator at K > 4096)."""

from __future__ import annotations

import pytest
import torch

from workbench.stats.gram import gram_update, mirror_upper

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("K,panel", [(50, 16), (64, 16), (40, 64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_upper_panels_mirrored_equal_the_full_gram(K, panel, dtype):
    g = torch.Generator().manual_seed(K)
    xs = [torch.randn(T, K, generator=g, dtype=dtype) for T in (7, 30, 1)]
    G = torch.zeros(K, K, dtype=dtype)
    upper = [gram_update(G, x, panel) for x in xs]
    assert upper == [K > panel] * 3
    if K > panel:
        assert not torch.equal(G, G.T)  # the lower triangle was not computed
        mirror_upper(G, panel)
    X = torch.cat(xs).double()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    ref = X.T @ X
    scale = float(ref.abs().max())
    assert float((G.double() - ref).abs().max()) < tol * scale
    # The mirrored strips are copies (bit-exact); a diagonal panel is one BLAS GEMM, whose blocking (it
    # follows the thread count) need not round a_ij and a_ji alike, so it is symmetric to rounding only.
    for s in range(0, K, panel):
        e = min(s + panel, K)
        assert torch.equal(G[e:, s:e], G[s:e, e:].T)
        d = G[s:e, s:e]
        assert float((d - d.T).abs().max()) <= tol * scale


@pytest.mark.skipif(not CUDA, reason="bf16 panels on the GPU")
def test_accumulator_gram_on_cuda_wide_input():
    from workbench.stats.accumulator import InputAccumulator

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5000, generator=g).to(torch.bfloat16)
    acc = InputAccumulator(5000, hist_bins=16)
    acc.add(x[:120].cuda())
    acc.add(x[120:].cuda())
    G = acc.result("wide").gram
    ref = x.double().T @ x.double()
    assert torch.equal(G, G.T)
    assert float((G - ref).norm() / ref.norm()) < 1e-5
