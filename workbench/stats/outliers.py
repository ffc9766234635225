"""How heavy-tailed a layer's input is: kurtosis and the max/median channel ratio, to compare a model before
and after a transform (workbench.transform.apply).

For the input x [tokens, K] of a linear layer over calibration batches:
    kurtosis     E[(x - μ)^4] / Var(x)^2 over every value of x (3 for a Gaussian; outlier channels make it
                 large; a rotation that spreads them brings it toward 3)
    max/median   max_j absmax_j / median_j absmax_j, absmax_j = max over tokens of |x[:, j]| (the inspection's
                 "channel 1229 is 1,267x the median channel")
    absmax       max |x|
Accumulated in float64 from power sums, so any number of batches streams through without keeping x.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from workbench.model.inventory import get_module


@dataclass
class OutlierStats:
    """Tail statistics of one layer's input (module docstring)."""

    layer: str
    kurtosis: float
    max_median: float
    absmax: float
    n_values: int

    def to_json(self) -> dict:
        return asdict(self)


class _Moments:
    def __init__(self):
        self.n = 0
        self.s = torch.zeros(4, dtype=torch.float64)  # sums of x, x^2, x^3, x^4
        self.chmax: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.n += x.numel()
        self.s += torch.stack([x.sum(), x.pow(2).sum(), x.pow(3).sum(), x.pow(4).sum()]).cpu()
        m = x.abs().amax(0).cpu()
        self.chmax = m if self.chmax is None else torch.maximum(self.chmax, m)

    def result(self, name: str) -> OutlierStats:
        m1, m2, m3, m4 = (self.s / self.n).tolist()
        var = m2 - m1 * m1
        c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1**4
        med = float(self.chmax.median())
        return OutlierStats(
            layer=name,
            kurtosis=c4 / var**2 if var > 0 else float("nan"),
            max_median=float(self.chmax.max()) / med if med > 0 else float("inf"),
            absmax=float(self.chmax.max()),
            n_values=self.n,
        )


def outlier_stats(x: torch.Tensor, name: str = "") -> OutlierStats:
    """OutlierStats of one input tensor x [..., K] (the same definitions as `input_outliers`)."""
    m = _Moments()
    m.add(x)
    return m.result(name)


@torch.no_grad()
def input_outliers(
    model: torch.nn.Module, names: list[str], batches: torch.Tensor
) -> dict[str, OutlierStats]:
    """OutlierStats of the inputs of the named linears over token batches [n, L] (one forward per window).

    The hooks run after any already on a layer (an online Hadamard rotates first: the statistics are those of
    what the matmul multiplies).
    """
    acc = {n: _Moments() for n in names}
    handles = [
        get_module(model, n).register_forward_pre_hook(lambda m, a, n=n: acc[n].add(a[0])) for n in names
    ]
    try:
        device = next(model.parameters()).device
        for ids in batches:
            model(input_ids=ids[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: a.result(n) for n, a in acc.items()}
