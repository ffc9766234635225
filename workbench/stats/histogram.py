"""Streaming histograms whose memory does not depend on how many values they have seen.

`StreamingHistogram` bins signed values on a symmetric range [-R, R] with B equal bins (B a multiple of 4).
R is a power of two fixed from the first chunk (the smallest power of two >= its absmax). When a later chunk
holds a larger value, R doubles until it fits and every pair of neighbouring bins merges into one: since R
is a power of two and B is a multiple of 4, the old edges nest exactly in the new ones, so the result equals
what a single pass with the final range would give (up to float rounding of values sitting on an edge).
One pass over the data, no second forward, no stored values; a value lands within one bin width of where a
direct `torch.histogram` with the final edges puts it.

`LogHistogram` bins log2 |x| on a fixed range of octaves with a fixed number of bins per octave; zeros and
values below the range land in the first bin, values above in the last.
"""

from __future__ import annotations

import math

import torch


def _pow2_at_least(x: float) -> float:
    """The smallest power of two >= x (at least 2**-24)."""
    if not math.isfinite(x):
        raise ValueError(f"non-finite value {x} in histogram input")
    return 2.0 ** max(-24, math.ceil(math.log2(x))) if x > 0 else 2.0**-24


class StreamingHistogram:
    """Fixed-size histogram of signed values on [-R, R], R a power of two that grows by doubling.

    Attributes:
        n_bins: B, a multiple of 4.
        radius: R (None until the first value arrives).
        counts: float64 [B] on the device of the first chunk.
    """

    def __init__(self, n_bins: int = 256):
        assert n_bins % 4 == 0 and n_bins >= 4, f"n_bins must be a multiple of 4, got {n_bins}"
        self.n_bins = n_bins
        self.radius: float | None = None
        self.counts: torch.Tensor | None = None

    def _grow(self, absmax: float) -> None:
        """Double R until it covers `absmax`, merging neighbouring bins exactly."""
        B = self.n_bins
        while absmax > self.radius:
            c = self.counts
            pairs = c.view(B // 2, 2).sum(1)  # [B/2] pairs of old bins
            new = torch.zeros_like(c)
            new[B // 4 : 3 * B // 4] = pairs  # old range is the middle half of the new one
            self.counts = new
            self.radius *= 2.0

    def add(self, x: torch.Tensor, absmax: float | None = None) -> None:
        """Count the values of `x` (any shape). `absmax`: max |x| when the caller already knows it."""
        if x.numel() == 0:
            return
        if absmax is None:
            absmax = float(x.abs().max())
        if self.radius is None:
            self.radius = _pow2_at_least(absmax)
            self.counts = torch.zeros(self.n_bins, dtype=torch.float64, device=x.device)
        elif absmax > self.radius:
            self._grow(absmax)
        R = self.radius
        xf = x.reshape(-1)
        if xf.dtype not in (torch.float32, torch.float64):
            xf = xf.float()
        self.counts += torch.histc(xf, bins=self.n_bins, min=-R, max=R).to(torch.float64)

    @property
    def edges(self) -> torch.Tensor:
        """float64 [B + 1] bin edges (empty before the first value)."""
        if self.radius is None:
            return torch.zeros(0, dtype=torch.float64)
        return torch.linspace(-self.radius, self.radius, self.n_bins + 1, dtype=torch.float64)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(edges float64 [B+1], counts float64 [B]) on the CPU."""
        if self.counts is None:
            return self.edges, torch.zeros(0, dtype=torch.float64)
        return self.edges, self.counts.cpu()


class LogHistogram:
    """Histogram of log2 |x| over fixed octaves [lo, hi) with `per_octave` bins per octave."""

    def __init__(self, lo: int = -24, hi: int = 24, per_octave: int = 4, device=None):
        assert hi > lo and per_octave >= 1, f"bad log-histogram range {lo}..{hi} x {per_octave}"
        self.lo, self.hi, self.per_octave = lo, hi, per_octave
        self.n_bins = (hi - lo) * per_octave
        self.counts = torch.zeros(self.n_bins, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Count |x| (any shape); out-of-range magnitudes (zeros included) go to the end bins."""
        a = x.reshape(-1).abs()
        if a.dtype not in (torch.float32, torch.float64):
            a = a.float()
        lg = torch.log2(a).clamp(self.lo, self.hi - 1e-6)  # -inf (zeros) clamps into the first bin
        if self.counts.device != a.device:
            self.counts = self.counts.to(a.device)
        self.counts += torch.histc(lg, bins=self.n_bins, min=self.lo, max=self.hi).to(torch.float64)

    @property
    def edges(self) -> torch.Tensor:
        """float64 [n_bins + 1] edges in log2 units."""
        return torch.linspace(self.lo, self.hi, self.n_bins + 1, dtype=torch.float64)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log2 edges float64 [n+1], counts float64 [n]) on the CPU."""
        return self.edges, self.counts.cpu()


def histogram_quantile(edges: torch.Tensor, counts: torch.Tensor, q: float) -> float:
    """The q-quantile (0..1) of a histogram, interpolated linearly inside its bin."""
    total = float(counts.sum())
    if total == 0:
        return float("nan")
    cum = torch.cumsum(counts, 0)
    target = q * total
    i = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)).clamp(max=len(counts) - 1))
    before = float(cum[i - 1]) if i > 0 else 0.0
    inside = float(counts[i])
    frac = (target - before) / inside if inside > 0 else 0.0
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))
