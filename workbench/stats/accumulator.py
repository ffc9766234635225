"""Streaming statistics of the input X [T, K] of one linear layer, and their final `ActivationStats`.

`InputAccumulator.add(x, token_ids)` folds one chunk of tokens into fixed-size running sums, so memory never
grows with the number of tokens:
    absmax[K], sum[K], sum of squares[K]          (float64)
    Gram  G = X^T X  [K, K]                        float64 on the CPU (exact products of float32 inputs);
                                                   float32 accumulation on CUDA
    signed-value histogram (power-of-two range that doubles as needed, see histogram.py)
    log2-histogram of per-token max |x| and the top-k tokens by max |x| (massive activations,
    Sun et al. 2024, https://arxiv.org/abs/2402.17762), with sequence, position, token id and channel.

On CUDA the Gram of bf16/fp16 inputs is computed with `out_dtype=float32` GEMMs (or TF32 matmuls where torch
lacks it): bf16 and fp16 values are exactly representable, so every product is exact and only the fp32
accumulation rounds; inputs wider than 4096 accumulate the upper block triangle only (stats/gram.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.stats.gram import gram_update, mirror_upper
from workbench.stats.histogram import LogHistogram, StreamingHistogram, histogram_quantile

TOP_TOKENS = 32
HIST_BINS = 256


@dataclass
class TokenMax:
    """The tokens with the largest max |x| over channels (massive activations), largest first.

    values/channels/seqs/positions/token_ids: [k]; token_ids are -1 when unknown. `log2_edges`/`log2_counts`:
    histogram of log2(max |x| per token) over all tokens (for the median token).
    """

    values: torch.Tensor
    channels: torch.Tensor
    seqs: torch.Tensor
    positions: torch.Tensor
    token_ids: torch.Tensor
    log2_edges: torch.Tensor
    log2_counts: torch.Tensor

    def median(self) -> float:
        """Median over tokens of max |x| (from the log2 histogram; within one bin, a quarter octave)."""
        return 2.0 ** histogram_quantile(self.log2_edges, self.log2_counts, 0.5)


@dataclass
class ActivationStats:
    """Statistics of the input of one quantizable linear, streamed over calibration tokens.

    Shapes: absmax/mean/rms [K]; gram [K, K] float64 (None when not collected); hist_edges [B+1],
    hist_counts [B]. `shared_with`: the layer whose identical input these statistics were computed from
    (q/k/v read one tensor, gate/up another); None for the layer that computed them.
    """

    name: str
    n_tokens: int
    absmax: torch.Tensor
    mean: torch.Tensor
    rms: torch.Tensor
    gram: torch.Tensor | None
    hist_edges: torch.Tensor
    hist_counts: torch.Tensor
    token_max: TokenMax
    shared_with: str | None = None

    @property
    def in_features(self) -> int:
        return int(self.absmax.numel())

    def outlier_ratio(self) -> torch.Tensor:
        """[K] channel absmax divided by the median channel absmax."""
        med = float(self.absmax.median())
        return self.absmax / med if med > 0 else torch.full_like(self.absmax, float("inf"))

    def outlier_channels(self, top: int = 8) -> list[tuple[int, float, float]]:
        """The `top` channels with the largest absmax: (channel, absmax, ratio to the median channel)."""
        ratio = self.outlier_ratio()
        k = min(top, self.absmax.numel())
        vals, idx = torch.topk(self.absmax, k)
        return [(int(i), float(v), float(ratio[i])) for v, i in zip(vals, idx)]


@dataclass
class InputAccumulator:
    """Running statistics of one input tensor stream (see module docstring).

    Args:
        K: input features.
        gram: accumulate X^T X.
        max_step_elems: split a chunk into steps of at most this many elements (bounds temporary memory).
    """

    K: int
    gram: bool = True
    hist_bins: int = HIST_BINS
    top_tokens: int = TOP_TOKENS
    max_step_elems: int | None = None
    n_tokens: int = 0
    _state: dict = field(default_factory=dict, repr=False)

    def _init(self, device: torch.device) -> None:
        K, f64 = self.K, torch.float64
        cpu = device.type == "cpu"
        s = self._state
        s["device"] = device
        s["absmax"] = torch.zeros(K, dtype=torch.float32, device=device)
        s["sum"] = torch.zeros(K, dtype=f64, device=device)
        s["sumsq"] = torch.zeros(K, dtype=f64, device=device)
        s["gram"] = (
            torch.zeros(K, K, dtype=f64 if cpu else torch.float32, device=device) if self.gram else None
        )
        s["hist"] = StreamingHistogram(self.hist_bins)
        s["tmax_hist"] = LogHistogram(-24, 24, 4, device=device)
        e = torch.empty(0, device=device)
        s["top"] = (e.float(), e.long(), e.long(), e.long(), e.long())  # value, channel, seq, pos, token id
        if self.max_step_elems is None:
            self.max_step_elems = 1 << 22 if cpu else 1 << 26

    @torch.no_grad()
    def add(
        self,
        x: torch.Tensor,
        seqs: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
    ) -> None:
        """Fold in one chunk. x [..., K]; seqs/positions/token_ids: long [T] per flattened row, or None."""
        assert x.shape[-1] == self.K, f"expected {self.K} input features, got shape {tuple(x.shape)}"
        x = x.detach().reshape(-1, self.K)
        if not self._state:
            self._init(x.device)
        T = x.shape[0]
        step = max(1, self.max_step_elems // self.K)
        for r0 in range(0, T, step):
            sl = slice(r0, min(T, r0 + step))
            self._add_step(x[sl], *(None if t is None else t[sl] for t in (seqs, positions, token_ids)))
        self.n_tokens += T

    def _add_step(self, x, seqs, positions, token_ids) -> None:
        s = self._state
        cpu = s["device"].type == "cpu"
        xf = x.float()
        a = xf.abs()
        col_max = a.amax(0)
        s["absmax"] = torch.maximum(s["absmax"], col_max)
        if cpu:  # sums and Gram in float64: exact products of float32 inputs
            xd = x.double()
            s["sum"] += xd.sum(0)
            s["sumsq"] += (xd * xd).sum(0)
            if s["gram"] is not None:
                s["gram"].addmm_(xd.t(), xd)
            del xd
        else:  # per-step float32 sums (a few thousand rows), accumulated in float64
            s["sum"] += xf.sum(0).double()
            s["sumsq"] += (xf * xf).sum(0).double()
            if s["gram"] is not None:
                s["gram_upper"] = gram_update(s["gram"], x) or s.get("gram_upper", False)
        s["hist"].add(xf, absmax=float(col_max.max()))
        tmax, tch = a.max(1)  # [T] per-token max |x| and its channel
        s["tmax_hist"].add(tmax)
        self._update_top(tmax, tch, seqs, positions, token_ids)

    def _update_top(self, tmax, tch, seqs, positions, token_ids) -> None:
        s = self._state
        k = min(self.top_tokens, tmax.numel())
        v, i = torch.topk(tmax, k)
        unknown = torch.full((k,), -1, dtype=torch.long, device=tmax.device)
        new = (
            v,
            tch[i],
            *(unknown if t is None else t.to(tmax.device)[i] for t in (seqs, positions, token_ids)),
        )
        cat = [torch.cat([old, n]) for old, n in zip(s["top"], new)]
        k = min(self.top_tokens, cat[0].numel())
        v, i = torch.topk(cat[0], k)
        s["top"] = tuple(c[i] for c in cat)

    def result(self, name: str, keep_gram: bool = True) -> ActivationStats:
        """Final statistics on the CPU (gram float64). `keep_gram=False` drops the Gram."""
        s = self._state
        assert s, f"no input was ever seen for layer '{name}'"
        n = max(self.n_tokens, 1)
        mean = s["sum"] / n
        rms = (s["sumsq"] / n).sqrt()
        gram = self.gram_tensor().double().cpu() if (s["gram"] is not None and keep_gram) else None
        edges, counts = s["hist"].result()
        ledges, lcounts = s["tmax_hist"].result()
        top = [t.cpu() for t in s["top"]]
        return ActivationStats(
            name=name,
            n_tokens=self.n_tokens,
            absmax=s["absmax"].cpu(),
            mean=mean.cpu(),
            rms=rms.cpu(),
            gram=gram,
            hist_edges=edges,
            hist_counts=counts,
            token_max=TokenMax(
                values=top[0],
                channels=top[1],
                seqs=top[2],
                positions=top[3],
                token_ids=top[4],
                log2_edges=ledges,
                log2_counts=lcounts,
            ),
        )

    def gram_tensor(self) -> torch.Tensor | None:
        """The running Gram on its device (float64 on CPU, float32 on CUDA; symmetric), or None."""
        G = self._state.get("gram")
        if G is not None and self._state.get("gram_upper"):
            mirror_upper(G)  # CUDA accumulates the upper block triangle only (stats/gram.py)
        return G
