"""Weight statistics of one linear layer, and the quantization grid a spec lays over it.

`weight_stats(W)` (W [N=out, K=in]) gives the moments (min, max, mean, std, excess kurtosis), the fraction
of weights beyond k standard deviations from the mean (k = 6 by default), absmax per output and per input
channel, how the value range of groups of G input channels spreads, and two fixed-bin histograms: linear
on [-absmax, absmax] and log2 |w| over the 24 octaves below absmax (zeros and smaller magnitudes land in
the first log bin).

`grid_levels(W, spec)` quantizes W with the quant core (`workbench.quant.registry.encode`), picks a
representative group (the one with the median scale, or the largest / smallest) and decodes every code of
that group's grid with `registry.decode`: the values a chart overlays on the weight histogram.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.errors import WorkbenchError
from workbench.quant.formats import Encoded, grouped
from workbench.quant.registry import decode, encode
from workbench.quant.spec import QuantSpec

HIST_BINS = 256
LOG_OCTAVES, LOG_PER_OCTAVE = 24, 4


@dataclass
class GridLevels:
    """The grid of one spec on one layer: sorted finite `levels` [n] (weight units) of group (row, group).

    `scale` is that group's scale; `which` says how the group was chosen (median / max / min scale).
    """

    spec: str
    levels: torch.Tensor
    row: int
    group: int
    scale: float
    which: str


@dataclass
class WeightStats:
    """Statistics of W [N, K]. absmax_out [N], absmax_in [K]; histograms: edges [B+1], counts [B]."""

    name: str
    shape: tuple[int, int]
    min: float
    max: float
    mean: float
    std: float
    kurtosis: float  # excess kurtosis (0 for a Gaussian)
    k_sigma: float
    frac_beyond_k_sigma: float
    absmax_out: torch.Tensor
    absmax_in: torch.Tensor
    group_size: int
    group_range_quantiles: dict[str, float]  # q0 / q50 / q99 / q100 of per-group (max - min)
    row_to_group_range: float  # median over rows of (row range / mean group range): what grouping buys
    hist_edges: torch.Tensor
    hist_counts: torch.Tensor
    log_edges: torch.Tensor  # log2 |w| edges
    log_counts: torch.Tensor
    grids: dict[str, GridLevels] = field(default_factory=dict)

    def scalars(self) -> dict:
        """The JSON-able scalar part."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "min": self.min,
            "max": self.max,
            "mean": self.mean,
            "std": self.std,
            "kurtosis": self.kurtosis,
            "k_sigma": self.k_sigma,
            "frac_beyond_k_sigma": self.frac_beyond_k_sigma,
            "group_size": self.group_size,
            "group_range_quantiles": self.group_range_quantiles,
            "row_to_group_range": self.row_to_group_range,
        }


def _moments(W: torch.Tensor, k_sigma: float) -> tuple[float, float, float, float]:
    """(mean, std, excess kurtosis, fraction beyond k_sigma) of float32 W, sums accumulated in float64."""
    n = W.numel()
    f64 = torch.float64
    mean = float(W.sum(dtype=f64)) / n
    d = W - mean
    d2 = d * d
    var = float(d2.sum(dtype=f64)) / n
    m4 = float((d2 * d2).sum(dtype=f64)) / n
    std = var**0.5
    kurt = m4 / (var * var) - 3.0 if var > 0 else 0.0
    beyond = int((d2 > (k_sigma * std) ** 2).sum()) if std > 0 else 0
    return mean, std, kurt, beyond / n


def _group_ranges(W: torch.Tensor, G: int) -> torch.Tensor:
    """Per-group (max - min) [N, ceil(K/G)] over groups of G columns (the last group may be shorter)."""
    N, K = W.shape
    full = K // G * G
    parts = []
    if full:
        Wg = W[:, :full].reshape(N, -1, G)
        parts.append(Wg.amax(-1) - Wg.amin(-1))
    if full < K:
        tail = W[:, full:]
        parts.append((tail.amax(-1) - tail.amin(-1)).unsqueeze(1))
    return torch.cat(parts, 1).float()


def weight_stats(
    W: torch.Tensor,
    k_sigma: float = 6.0,
    *,
    name: str = "",
    group_size: int = 128,
    specs: list[str] | tuple[str, ...] = (),
    hist_bins: int = HIST_BINS,
) -> WeightStats:
    """Statistics of a weight W [N, K] (see module docstring).

    Args:
        k_sigma: report the fraction of weights with |w - mean| > k_sigma * std.
        name: the layer name (stored, and named in errors).
        group_size: G for the per-group range spread (clipped to K).
        specs: quantization specs whose grid levels to compute (bf16/fp16 have none and are skipped).
    """
    if W.dim() != 2 or W.numel() == 0:
        raise WorkbenchError(f"layer '{name}': weight must be a non-empty 2-D matrix, got {tuple(W.shape)}")
    W = W.detach()
    Wf = W.float()
    if not torch.isfinite(Wf).all():
        raise WorkbenchError(f"layer '{name}': weight has NaN or inf values")
    N, K = W.shape
    mean, std, kurt, frac = _moments(Wf, k_sigma)
    a = Wf.abs()
    amax = float(a.max())
    radius = amax if amax > 0 else 1.0
    counts = torch.histc(Wf.reshape(-1), bins=hist_bins, min=-radius, max=radius).double().cpu()
    hi = int(torch.tensor(radius).log2().ceil())
    lo = hi - LOG_OCTAVES
    n_log = LOG_OCTAVES * LOG_PER_OCTAVE
    lg = torch.log2(a.reshape(-1)).clamp(lo, hi - 1e-6)
    log_counts = torch.histc(lg, bins=n_log, min=lo, max=hi).double().cpu()
    G = min(group_size, K)
    ranges = _group_ranges(Wf, G)
    row_range = (Wf.amax(1) - Wf.amin(1)).float()
    ratio = row_range / ranges.mean(1).clamp_min(1e-30)
    q = torch.quantile(
        ranges.reshape(-1)[: 1 << 24], torch.tensor([0.0, 0.5, 0.99, 1.0], device=ranges.device)
    )
    stats = WeightStats(
        name=name,
        shape=(N, K),
        min=float(Wf.min()),
        max=float(Wf.max()),
        mean=mean,
        std=std,
        kurtosis=kurt,
        k_sigma=k_sigma,
        frac_beyond_k_sigma=frac,
        absmax_out=a.amax(1).cpu(),
        absmax_in=a.amax(0).cpu(),
        group_size=G,
        group_range_quantiles={k: float(v) for k, v in zip(("q0", "q50", "q99", "q100"), q)},
        row_to_group_range=float(ratio.median()),
        hist_edges=torch.linspace(-radius, radius, hist_bins + 1, dtype=torch.float64),
        hist_counts=counts,
        log_edges=torch.linspace(lo, hi, n_log + 1, dtype=torch.float64),
        log_counts=log_counts,
    )
    for s in specs:
        spec = QuantSpec.parse(s)
        if not spec.is_quantized or spec.check_layer(N, K) is not None:
            continue
        stats.grids[str(spec)] = grid_levels(Wf, spec)
    return stats


def grid_levels(W: torch.Tensor, spec: str | QuantSpec, which: str = "median") -> GridLevels:
    """Every value the grid of `spec` can represent for one representative group of W [N, K].

    Args:
        which: "median" (the group with the median scale), "max" or "min".
    Returns:
        GridLevels with sorted, de-duplicated finite levels in weight units.
    """
    spec = QuantSpec.parse(spec)
    if not spec.is_quantized:
        raise WorkbenchError(f"spec '{spec}' keeps weights in high precision: it has no grid")
    if which not in ("median", "max", "min"):
        raise WorkbenchError(f"unknown group choice '{which}' (choose median, max or min)")
    Wg = grouped(W.detach().float(), spec)  # [R, n_groups, G]
    enc = encode(spec, Wg)
    flat = enc.scales.reshape(-1)
    order = torch.argsort(flat)
    pick = {"median": order[len(order) // 2], "max": order[-1], "min": order[0]}[which]
    r, g = divmod(int(pick), enc.scales.shape[1])
    n_codes = 2**spec.bits
    codes = torch.arange(n_codes, dtype=torch.uint8, device=enc.scales.device).view(1, 1, n_codes)
    one = Encoded(
        codes=codes,
        scales=enc.scales[r : r + 1, g : g + 1],
        zeros=None if enc.zeros is None else enc.zeros[r : r + 1, g : g + 1],
        tensor_scale=enc.tensor_scale,
    )
    vals = decode(spec, one).reshape(-1)
    vals = torch.unique(vals[torch.isfinite(vals)]).cpu()  # sorted
    return GridLevels(spec=str(spec), levels=vals, row=r, group=g, scale=float(enc.scales[r, g]), which=which)


def outlier_summary(W: torch.Tensor) -> tuple[float, float]:
    """(max |w| / median |w|, excess kurtosis) of W [N, K]: the two numbers that rank layers by outliers
    (the model table's columns). Moments in float64; the median of |w| on at most 2^22 evenly strided
    weights (exact for smaller layers)."""
    w = W.detach().reshape(-1).float()
    a = w.abs()
    step = max(1, a.numel() >> 22)
    med = float(a[::step].median())
    x = w.double()
    c = x - x.mean()
    var = float((c * c).mean())
    kurt = float((c**4).mean()) / var**2 - 3.0 if var > 0 else 0.0
    return (float(a.max()) / med if med > 0 else float("inf")), kurt
