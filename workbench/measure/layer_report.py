"""Everything shown about one layer on the app's Distributions tab, computed by the core.

`layer_report(loaded, name, grid_spec, specs, inspection=None)` gathers, for one quantizable linear:
- its weight statistics (`stats.weights.weight_stats`: histograms linear and log2, absmax per output and
  per input channel) and the grid levels of `grid_spec` (`stats.weights.grid_levels`);
- outlier flags for the channel absmax bars: a channel is an outlier when its absmax exceeds `ratio` times
  the median channel absmax (`outlier_mask`);
- its calibration activation statistics when an `Inspection` is given (absmax per input channel,
  histogram of x values);
- the quantization error of each candidate spec (`spec_errors`): weight SQNR in dB, and when the layer's
  Gram matrix G = X^T X is known the relative output error tr(D G D^T) / tr(W G W^T) with
  D = W - fake_quant(W, spec, G) (`quant.metrics.output_error`, the proxy of sensitivity.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from workbench.errors import WorkbenchError
from workbench.quant.api import fake_quant
from workbench.quant.metrics import output_error, sqnr_db
from workbench.quant.spec import QuantSpec

OUTLIER_RATIO = 4.0


def outlier_mask(absmax: torch.Tensor, ratio: float = OUTLIER_RATIO) -> torch.Tensor:
    """[C] bool: channels whose absmax exceeds `ratio` x the median channel absmax."""
    assert absmax.dim() == 1, "absmax must be [C]"
    med = float(absmax.float().median())
    if med <= 0:
        return absmax > 0
    return absmax.float() > ratio * med


@dataclass
class SpecError:
    """The error of quantizing one layer with one spec (RTN unless the spec says gptq/awq)."""

    spec: str
    bits_per_weight: float
    sqnr_db: float
    output_error: float | None  # relative output error on the calibration inputs (None without a Gram)


def spec_errors(
    W: torch.Tensor, specs: list[str], gram: torch.Tensor | None = None, layer: str = ""
) -> list[SpecError]:
    """Error of each spec on W [N, K] (specs needing a Gram - gptq, awq - are skipped without one)."""
    N, K = W.shape
    out = []
    for s in specs:
        spec = QuantSpec.parse(s)
        if spec.algo != "rtn" and gram is None:
            continue
        W_hat = fake_quant(W, spec, gram if spec.algo != "rtn" else None, layer=layer)
        out.append(
            SpecError(
                spec=str(spec),
                bits_per_weight=spec.bits_per_weight(out_features=N, in_features=K),
                sqnr_db=sqnr_db(W, W_hat),
                output_error=None if gram is None else output_error(W, W_hat, gram),
            )
        )
    return out


@dataclass
class LayerReport:
    """What the Distributions tab draws for one layer (tensors are CPU, 1-D unless noted)."""

    name: str
    shape: tuple[int, int]
    weights: object  # stats.weights.WeightStats
    grid_spec: str | None
    grid: object | None  # stats.weights.GridLevels of grid_spec (None for bf16/fp16)
    out_outliers: torch.Tensor  # [N] bool
    in_outliers: torch.Tensor  # [K] bool
    activations: object | None = None  # stats.accumulator.ActivationStats (None without an inspection)
    act_outliers: torch.Tensor | None = None  # [K] bool
    errors: list[SpecError] = field(default_factory=list)
    ratio: float = OUTLIER_RATIO


def layer_report(
    loaded, name: str, grid_spec: str | None, specs: list[str], inspection=None, ratio: float = OUTLIER_RATIO
) -> LayerReport:
    """Statistics, grid, outliers and per-spec errors of layer `name` of `loaded` (see module doc)."""
    from workbench.model.inventory import get_linear_weight, get_module
    from workbench.stats.weights import grid_levels, weight_stats

    W = get_linear_weight(get_module(loaded.model, name)).detach().float().cpu()  # [N, K]
    ws = weight_stats(W, name=name)
    grid = None
    if grid_spec is not None and QuantSpec.parse(grid_spec).is_quantized:
        grid = grid_levels(W, grid_spec)
    acts = None
    gram = None
    if inspection is not None:
        acts = inspection.activations.get(name)
        if acts is None:
            raise WorkbenchError(f"layer '{name}' has no activation statistics in this inspection")
        gram = acts.gram
    errors = spec_errors(W, specs, gram=None if gram is None else gram.float(), layer=name)
    return LayerReport(
        name=name,
        shape=tuple(W.shape),
        weights=ws,
        grid_spec=grid_spec,
        grid=grid,
        out_outliers=outlier_mask(ws.absmax_out, ratio),
        in_outliers=outlier_mask(ws.absmax_in, ratio),
        activations=acts,
        act_outliers=None if acts is None else outlier_mask(acts.absmax, ratio),
        errors=errors,
        ratio=ratio,
    )


def finite_or_none(x: float) -> float | None:
    """x, or None when it is inf/nan (an exact quantization has infinite SQNR)."""
    return x if math.isfinite(x) else None
