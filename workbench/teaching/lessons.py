"""Small computations behind the teaching notebooks (notebooks/), so that the notebooks hold no logic.

Each function takes a real weight or real statistics and returns plain numbers (dataclasses, lists of
dicts ready for a table); the figures are drawn by `workbench.ui.teaching_charts`. Weights are [N=out,
K=in], groups run along K from column 0 (docs/ARCHITECTURE.md).

    quick_mode()                       WORKBENCH_QUICK=1: the notebooks shrink token counts (CI)
    spec_for(fmt, bits, group)         widget choices -> a QuantSpec string
    walk_through_group(W, spec, r, g)  one group of one row: scale, zero point, codes, rounding error
    spec_sweep(W, specs, gram)         bits per weight, SQNR, output error of each spec on one layer
    sqnr_slope(rows)                   dB gained per extra bit (uniform rounding: ~6.02 dB/bit)
    group_levels(W, spec, r, g)        every value the grid of one group can represent
    row_view(W, spec, r)               one row before / after quantization with its group boundaries
    distinct_values_per_group(W, G)    how many distinct values each group holds (already-quantized files)
    most_outlying_group(W, G)          the group whose largest weight stands furthest above the rest
    outlier_effect(W, spec, r, g)      what that one weight costs the other weights of its group
    weight_outlier_table(model, names) per layer: max |w| / std, share of weights beyond 6 sigma
    activation_outlier_table(stats)    per layer: the input channel with the largest |x| and its ratio
    massive_activation_table(stats)    per layer: the largest |x| of any token vs the median token

Plans and speed (notebooks 03-05) are in `workbench.teaching.plans`.

References: uniform quantization noise Delta^2 / 12 (Widrow & Kollar, "Quantization Noise", 2008);
outlier features (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339); massive activations (Sun et al.
2024, https://arxiv.org/abs/2402.17762).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.quant.api import fake_quant, quantize_weight
from workbench.quant.formats import Encoded
from workbench.quant.metrics import output_error, sqnr_db, weight_mse
from workbench.quant.registry import decode
from workbench.quant.spec import QuantSpec

QUICK_ENV = "WORKBENCH_QUICK"
FORMAT_CHOICES = ("int", "int_sym", "fp4_e2m1", "nf4", "mxfp4", "nvfp4", "fp8_e4m3", "fp8_e5m2")


def quick_mode() -> bool:
    """True when WORKBENCH_QUICK=1 (set by the notebook test): notebooks use fewer tokens."""
    return os.environ.get(QUICK_ENV, "") == "1"


def spec_for(fmt: str, bits: int = 4, group: int | str = 128) -> str:
    """The spec string for a format / bits / group-size choice (formats with fixed widths ignore `bits`).

    Args:
        fmt: one of FORMAT_CHOICES ("int" is asymmetric, "int_sym" symmetric).
        bits: integer width (int formats only).
        group: group size, "ch" (per output channel) or "t" (per tensor); fp8 uses "ch"/"t" (a number
            means per channel), mxfp4 / nvfp4 have fixed blocks and ignore it, fp4_e2m1 / nf4 need a
            number.
    Returns:
        a canonical spec string, e.g. "int3_g64", "nf4_g128", "fp8_e4m3".
    """
    gran = f"g{group}" if isinstance(group, int) else str(group)
    if fmt in ("int", "int_sym"):
        s = f"int{bits}_{gran}" + ("_sym" if fmt == "int_sym" else "")
    elif fmt in ("fp4_e2m1", "nf4"):
        if not isinstance(group, int):
            raise WorkbenchError(f"{fmt} has a scale per group: choose a group size, not '{group}'")
        s = f"{fmt}_{gran}"
    elif fmt in ("mxfp4", "nvfp4"):
        s = fmt
    elif fmt in ("fp8_e4m3", "fp8_e5m2"):
        s = f"{fmt}_t" if group == "t" else fmt
    else:
        raise WorkbenchError(f"unknown format choice '{fmt}' (choose one of {', '.join(FORMAT_CHOICES)})")
    return str(QuantSpec.parse(s))


def _check_cell(W: torch.Tensor, spec: QuantSpec, row: int, group: int) -> tuple[int, int]:
    """Column range [c0, c1) of group `group` of row `row` under `spec` (WorkbenchError if out of range)."""
    N, K = W.shape
    G = spec.group_size if spec.granularity == "group" else K
    if not 0 <= row < N:
        raise WorkbenchError(f"row {row} outside 0..{N - 1}")
    n_groups = -(-K // G)
    if not 0 <= group < n_groups:
        raise WorkbenchError(f"group {group} outside 0..{n_groups - 1} for '{spec}' on K={K}")
    return group * G, min(K, (group + 1) * G)


@dataclass
class GroupWalkthrough:
    """One group of one row quantized step by step. values/codes/dequantized: [G]."""

    spec: str
    row: int
    group: int
    columns: tuple[int, int]
    values: torch.Tensor
    codes: torch.Tensor
    dequantized: torch.Tensor
    scale: float
    zero: float | None  # int formats: the zero point (stored when asymmetric, 2^(b-1) when symmetric)
    xmin: float
    xmax: float

    @property
    def max_error(self) -> float:
        return float((self.values - self.dequantized).abs().max())

    @property
    def distinct_errors(self) -> int:
        """How many different rounding errors the group has (1: the weights sat on a shifted grid)."""
        return int(torch.unique(self.values - self.dequantized).numel())

    def rows(self, n: int | None = None) -> list[dict]:
        """The first `n` weights as table rows: column, weight, code, dequantized, error."""
        k = len(self.values) if n is None else min(n, len(self.values))
        c0 = self.columns[0]
        return [
            {
                "column": c0 + i,
                "weight": float(self.values[i]),
                "code": int(self.codes[i]),
                "dequantized": float(self.dequantized[i]),
                "error": float(self.values[i] - self.dequantized[i]),
            }
            for i in range(k)
        ]


def walk_through_group(
    W: torch.Tensor, spec: str | QuantSpec, row: int = 0, group: int = 0
) -> GroupWalkthrough:
    """Quantize W with `spec` and return what happened to one group of one row.

    Args:
        W: [N, K] weight. spec: a group or channel spec. row, group: which cell to show.
    """
    spec = QuantSpec.parse(spec)
    c0, c1 = _check_cell(W, spec, row, group)
    qw = quantize_weight(W.float(), spec)
    g = group if spec.granularity == "group" else 0
    r = row if spec.granularity != "tensor" else 0
    zero = None
    if spec.fmt == "int":
        zero = float(2 ** (spec.bits - 1)) if qw.zeros is None else float(qw.zeros[r, g])
    vals = W[row, c0:c1].float()
    return GroupWalkthrough(
        str(spec),
        row,
        group,
        (c0, c1),
        vals,
        qw.codes[row, c0:c1].clone(),
        qw.dequantize()[row, c0:c1],
        float(qw.scales[r, g]),
        zero,
        float(vals.min()),
        float(vals.max()),
    )


def spec_sweep(W: torch.Tensor, specs: list[str], gram: torch.Tensor | None = None) -> list[dict]:
    """Quantization error of one weight under each spec.

    Args:
        W: [N, K] weight. specs: spec strings (round-to-nearest unless the spec names an algorithm).
        gram: optional [K, K] X^T X of the layer's inputs: adds the relative output error.
    Returns:
        one dict per spec: spec, bits_per_weight (metadata included), sqnr_db, rel_mse (MSE / mean W^2),
        and output_error when `gram` is given.
    """
    W = W.float()
    N, K = W.shape
    power = float((W.double() ** 2).mean())
    rows = []
    for s in specs:
        spec = QuantSpec.parse(s)
        W_hat = fake_quant(W, spec, gram)
        row = {
            "spec": str(spec),
            "bits_per_weight": spec.bits_per_weight(out_features=N, in_features=K),
            "sqnr_db": sqnr_db(W, W_hat),
            "rel_mse": weight_mse(W, W_hat) / power if power > 0 else math.inf,
        }
        if gram is not None:
            row["output_error"] = output_error(W, W_hat, gram)
        rows.append(row)
    return rows


def sqnr_slope(rows: list[dict], x: str = "bits") -> float:
    """Least-squares slope of sqnr_db against `x` (a key of rows, or "bits" parsed from each spec)."""
    xs = [QuantSpec.parse(r["spec"]).bits if x == "bits" else float(r[x]) for r in rows]
    ys = [r["sqnr_db"] for r in rows]
    if len(xs) < 2 or not all(math.isfinite(y) for y in ys):
        raise WorkbenchError("sqnr_slope needs at least two rows with finite SQNR")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((a - mx) ** 2 for a in xs)
    assert var > 0, "sqnr_slope: all x values are equal"
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / var


def group_levels(W: torch.Tensor, spec: str | QuantSpec, row: int = 0, group: int = 0) -> torch.Tensor:
    """Every finite value one group's grid can represent (sorted, unique), in weight units.

    Decodes each possible code with that group's own scale (and zero point / tensor scale), so what is
    drawn is exactly what the quantizer rounds to.
    """
    spec = QuantSpec.parse(spec)
    _check_cell(W, spec, row, group)
    qw = quantize_weight(W.float(), spec)
    g = group if spec.granularity == "group" else 0
    r = row if spec.granularity != "tensor" else 0
    n = 2**spec.bits  # every code of the format (16 for nf4 and the 4-bit floats)
    codes = torch.arange(n, dtype=torch.uint8).reshape(1, 1, n)
    zeros = qw.zeros[r : r + 1, g : g + 1] if qw.zeros is not None else None
    enc = Encoded(codes, qw.scales[r : r + 1, g : g + 1], zeros, qw.tensor_scale)
    vals = decode(spec, enc).flatten()
    return torch.unique(vals[torch.isfinite(vals)])


def value_histogram(x: torch.Tensor, bins: int = 80) -> tuple[list[float], list[int]]:
    """Histogram of the values of `x` over [min, max]: (edges [bins+1], counts [bins])."""
    x = x.detach().float().flatten()
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        hi = lo + 1e-12
    counts = torch.histc(x, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1)
    return edges.tolist(), [int(c) for c in counts]


@dataclass
class RowView:
    """A stretch of one row of W before and after quantization.

    weights/dequantized: one value per column of `columns`; boundaries: the group starts inside `columns`.
    """

    spec: str
    row: int
    columns: range
    weights: list[float]
    dequantized: list[float]
    boundaries: list[int]
    sqnr_db: float  # of the whole layer, not only this row
    bits_per_weight: float


def row_view(
    W: torch.Tensor, spec: str | QuantSpec, row: int = 0, max_columns: int = 256, start: int = 0
) -> RowView:
    """Row `row` of W and of fake_quant(W, spec), columns [start, start + max_columns) clipped to K."""
    spec = QuantSpec.parse(spec)
    N, K = W.shape
    if not 0 <= row < N:
        raise WorkbenchError(f"row {row} outside 0..{N - 1}")
    if not 0 <= start < K:
        raise WorkbenchError(f"start column {start} outside 0..{K - 1}")
    W = W.float()
    W_hat = fake_quant(W, spec)
    stop = min(K, start + max_columns)
    G = spec.group_size if spec.granularity == "group" else None
    bounds = [c for c in range(start, stop) if c % G == 0] if G else []
    return RowView(
        str(spec),
        row,
        range(start, stop),
        W[row, start:stop].tolist(),
        W_hat[row, start:stop].tolist(),
        bounds,
        sqnr_db(W, W_hat),
        spec.bits_per_weight(out_features=N, in_features=K),
    )


def distinct_values_per_group(W: torch.Tensor, group_size: int) -> list[int]:
    """Number of distinct values in each full group of `group_size` columns (row-major order).

    A weight that already went through a 4-bit format of that block size has at most 16 per group.
    """
    N, K = W.shape
    k = K // group_size * group_size
    if k == 0:
        raise WorkbenchError(f"group size {group_size} is larger than K={K}")
    G = W[:, :k].detach().reshape(-1, group_size)
    s = G.sort(-1).values
    return (1 + (s[:, 1:] != s[:, :-1]).sum(-1)).tolist()


def most_outlying_group(W: torch.Tensor, group_size: int) -> tuple[int, int, float]:
    """(row, group, ratio): the group of `group_size` columns whose max |w| is largest relative to the
    median |w| of the same group."""
    Wg = W.detach().float().abs()
    N, K = Wg.shape
    pad = (-K) % group_size
    if pad:
        Wg = torch.nn.functional.pad(Wg, (0, pad), value=float("nan"))
    Wg = Wg.reshape(N, -1, group_size)
    ratio = Wg.nan_to_num(0.0).amax(-1) / Wg.nanmedian(-1).values.clamp_min(1e-12)
    flat = int(ratio.argmax())
    return flat // ratio.shape[1], flat % ratio.shape[1], float(ratio.flatten()[flat])


@dataclass
class OutlierEffect:
    """What one large weight costs the others of its group (errors are RMS over the other weights)."""

    spec: str
    row: int
    group: int
    outlier_column: int
    outlier_value: float
    next_largest: float  # largest |w| among the other weights of the group
    levels_used_with: int  # distinct codes the other weights use with the outlier in the group
    levels_used_without: int  # ... when the outlier is clipped to the next largest magnitude
    rms_error_with: float
    rms_error_without: float

    @property
    def error_ratio(self) -> float:
        return self.rms_error_with / self.rms_error_without if self.rms_error_without > 0 else math.inf


def outlier_effect(W: torch.Tensor, spec: str | QuantSpec, row: int, group: int) -> OutlierEffect:
    """Quantize one group with its largest weight, then with that weight clipped to the next largest
    magnitude, and compare the error on the *other* weights of the group."""
    spec = QuantSpec.parse(spec)
    c0, c1 = _check_cell(W, spec, row, group)
    vals = W[row, c0:c1].detach().float().clone()
    j = int(vals.abs().argmax())
    others = torch.ones_like(vals, dtype=torch.bool)
    others[j] = False
    nxt = float(vals[others].abs().max())
    clipped = vals.clone()
    clipped[j] = math.copysign(nxt, float(vals[j]))

    def _one(v: torch.Tensor) -> tuple[int, float]:
        qw = quantize_weight(v.reshape(1, -1), spec)
        err = (v - qw.dequantize()[0])[others]
        return int(torch.unique(qw.codes[0][others]).numel()), float(err.pow(2).mean().sqrt())

    used_with, e_with = _one(vals)
    used_without, e_without = _one(clipped)
    return OutlierEffect(
        str(spec), row, group, c0 + j, float(vals[j]), nxt, used_with, used_without, e_with, e_without
    )


# ------------------------------------------------------------------------------------------ model tables
def weight_outlier_table(model: torch.nn.Module, layers: list, k_sigma: float = 6.0) -> list[dict]:
    """Per layer: max |w| / std, share of weights beyond k_sigma standard deviations, excess kurtosis.

    Only these moments (float32 sums in float64 per row): `workbench.stats.weights.weight_stats` also builds
    histograms and group-range quantiles, which is too slow for every layer of a model in a notebook cell.

    Args:
        model: the nn.Module. layers: LayerInfo objects (workbench.layer_inventory) or layer names.
    Returns:
        rows: layer, role, block, absmax, std, absmax_over_std, beyond_k_sigma (fraction), excess_kurtosis.
    """
    from workbench.model.inventory import get_linear_weight, layer_inventory

    info = {x.name: x for x in layer_inventory(model)}
    modules = dict(model.named_modules())
    rows = []
    for layer in layers:
        name = getattr(layer, "name", layer)
        if name not in info:
            raise WorkbenchError(f"layer '{name}' is not a quantizable linear of the model")
        W = get_linear_weight(modules[name]).detach().float()
        n = W.numel()
        mu = float(W.sum(1, dtype=torch.float64).sum()) / n
        d = W - mu
        d2 = d * d
        var = float(d2.sum(1, dtype=torch.float64).sum()) / n
        sd = math.sqrt(var)
        m4 = float((d2 * d2).sum(1, dtype=torch.float64).sum()) / n
        absmax = float(W.abs().max())
        rows.append(
            {
                "layer": name,
                "role": info[name].role,
                "block": info[name].block,
                "absmax": absmax,
                "std": sd,
                "absmax_over_std": absmax / sd if sd > 0 else math.inf,
                "beyond_k_sigma": float((d.abs() > k_sigma * sd).sum()) / n,
                "excess_kurtosis": m4 / (var * var) - 3.0 if var > 0 else 0.0,
            }
        )
    return rows


def activation_outlier_table(stats: dict, top: int = 3) -> list[dict]:
    """Per layer (ActivationStats from workbench.stats): the `top` input channels by max |x|.

    Returns rows: layer, channels (list), absmax of the top channel, ratio of the top channel's absmax to
    the median channel's absmax.
    """
    rows = []
    for name, st in stats.items():
        ch = st.outlier_channels(top)
        rows.append(
            {
                "layer": name,
                "top_channels": [c for c, _, _ in ch],
                "absmax": ch[0][1],
                "median_channel_absmax": float(st.absmax.median()),
                "ratio_to_median": ch[0][2],
            }
        )
    return rows


def massive_activation_table(stats: dict, tokenizer=None) -> list[dict]:
    """Per layer: the largest |x| of any single token vs the median token's largest |x| (Sun et al. 2024).

    Returns rows: layer, max_abs, median_token_max, ratio, channel, position, token (decoded when a
    tokenizer is given and the token id is known).
    """
    rows = []
    for name, st in stats.items():
        tm = st.token_max
        med = tm.median()
        tok_id = int(tm.token_ids[0])
        token = tokenizer.decode([tok_id]) if tokenizer is not None and tok_id >= 0 else str(tok_id)
        rows.append(
            {
                "layer": name,
                "max_abs": float(tm.values[0]),
                "median_token_max": med,
                "ratio": float(tm.values[0]) / med if med > 0 else math.inf,
                "channel": int(tm.channels[0]),
                "position": int(tm.positions[0]),
                "token": token,
            }
        )
    return rows
