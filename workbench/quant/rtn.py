"""Round-to-nearest quantization with an optional clipping (range shrink) search.

Clipping criterion (documented contract): for each scale group independently, try shrink factors
p in {1, 1 - s/n, ..., 1 - s(n-1)/n} (s = `max_shrink`, n = `grid`) that scale the group's range (integers)
or absmax (float formats) by p, and keep the p with the smallest
    - weight squared error sum_j (w_j - w_hat_j)^2 over the group, when no Gram matrix is given;
    - output error d_g G_gg d_g^T when a Gram matrix G = X^T X is given, where d_g is the group's error and
      G_gg the diagonal block of G for the group's input channels. Cross-group terms of tr(D G D^T) are
      ignored (exact for per-channel and per-tensor granularity, where the group is the whole row / tensor).
p = 1 (no clipping) is always a candidate, so the criterion never gets worse than plain RTN.
The same idea is used by GPTQ's `mse` option and AWQ's auto-clip (https://arxiv.org/abs/2306.00978).
"""

from __future__ import annotations

import torch

from workbench.quant.formats import Encoded, grouped, ungrouped
from workbench.quant.registry import decode, encode
from workbench.quant.spec import QuantSpec


def group_errors(
    Dg: torch.Tensor, spec: QuantSpec, N: int, K: int, gram: torch.Tensor | None
) -> torch.Tensor:
    """Error of each group of a grouped error tensor Dg [R, n_groups, G] -> [R, n_groups] (see module doc)."""
    if gram is None:
        return (Dg.double() ** 2).sum(-1)
    gram = gram.float()
    if spec.granularity == "tensor":
        D = ungrouped(Dg, spec, N, K)
        return ((D @ gram).double() * D.double()).sum().reshape(1, 1)
    if spec.granularity == "channel":
        D = Dg[:, 0, :]
        return ((D @ gram).double() * D.double()).sum(-1, keepdim=True)
    G = spec.group_size
    ng = Dg.shape[1]
    pad = ng * G - K
    gp = torch.nn.functional.pad(gram, (0, pad, 0, pad)) if pad else gram
    blocks = torch.stack([gp[i * G : (i + 1) * G, i * G : (i + 1) * G] for i in range(ng)])  # [ng, G, G]
    DG = torch.einsum("rgi,gij->rgj", Dg, blocks)
    return (DG.double() * Dg.double()).sum(-1)


def clip_search(
    W: torch.Tensor,
    spec: QuantSpec,
    gram: torch.Tensor | None = None,
    grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """Best shrink factor per group (float32 [R, n_groups]) for `spec` on W [N, K] (criterion: module doc)."""
    N, K = W.shape
    Wg = grouped(W, spec)
    best_err = None
    best = torch.ones(Wg.shape[:2], device=W.device)
    for i in range(grid):
        p = 1.0 - max_shrink * i / grid
        Dg = Wg - decode(spec, encode(spec, Wg, p))
        err = group_errors(Dg, spec, N, K, gram)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, p), best)
    return best


def rtn_quantize(
    W: torch.Tensor,
    spec: QuantSpec,
    gram: torch.Tensor | None = None,
    clip: bool = False,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
) -> Encoded:
    """Round-to-nearest quantization of W [N, K] (float32) with `spec`'s format and granularity.

    Args:
        W: [N, K] float32 weight.
        spec: a quantized spec (any format).
        gram: optional [K, K] X^T X; only used by the clipping search.
        clip: run the clipping search (module doc) before the final rounding.
        clip_grid, max_shrink: candidate shrink factors 1 - max_shrink * i / clip_grid, i < clip_grid.
    Returns:
        Encoded with grouped codes [R, n_groups, G] and scales/zeros [R, n_groups].
    """
    Wg = grouped(W, spec)
    shrink = clip_search(W, spec, gram, clip_grid, max_shrink) if clip else None
    return encode(spec, Wg, shrink)
