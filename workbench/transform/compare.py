"""A layer's input before and after a transform, side by side: distribution, kurtosis, max/median (issue 16).

`compare_transform(loaded, layer, transforms)` runs the same calibration windows through the original model
and through its transformed copy (`workbench.transform.apply.apply_transforms`) and records what the layer's
matmul multiplies in each (after an online Hadamard, for down_proj): per-channel absmax [K], a histogram of
the values, and the tail statistics of `stats.outliers` (kurtosis, max/median channel, absmax). The app's
Transforms tab draws it (`ui/transform_charts.py`); the numbers are the ones `workbench outliers` prints.
Rotations: QuaRot (https://arxiv.org/abs/2404.00456); smoothing: SmoothQuant (https://arxiv.org/abs/2211.10438).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.plan.transforms import Hadamard, Smooth
from workbench.stats.outliers import OutlierStats, outlier_stats

# name -> transform list, the choices the app offers (any plan transform list works in the function)
PRESETS: dict[str, list] = {
    "hadamard residual + down": [Hadamard("residual", 0), Hadamard("down", 0)],
    "hadamard residual": [Hadamard("residual", 0)],
    "hadamard down": [Hadamard("down", 0)],
    "smooth α=0.5": [Smooth("re:.*", 0.5, 8)],
}


@dataclass
class InputProfile:
    """One layer input: statistics, per-channel absmax [K] and a histogram (edges [bins+1], counts [bins])."""

    stats: OutlierStats
    channel_absmax: list[float]
    edges: list[float]
    counts: list[int]


@dataclass
class InputComparison:
    layer: str
    transforms: list
    before: InputProfile
    after: InputProfile
    n_tokens: int


def _profile(x: torch.Tensor, name: str, bins: int) -> InputProfile:
    """InputProfile of x [T, K] float32; the histogram spans [-absmax, absmax] in `bins` equal bins."""
    amax = float(x.abs().max()) or 1.0
    counts = torch.histc(x, bins=bins, min=-amax, max=amax)
    edges = torch.linspace(-amax, amax, bins + 1)
    return InputProfile(
        outlier_stats(x, name), x.abs().amax(0).tolist(), edges.tolist(), counts.long().tolist()
    )


@torch.no_grad()
def _layer_input(model: torch.nn.Module, name: str, batches: torch.Tensor) -> torch.Tensor:
    """The input [T, K] (float32) layer `name` multiplies, over token batches [n, L]."""
    from workbench.model.inventory import get_module

    xs: list[torch.Tensor] = []
    h = get_module(model, name).register_forward_pre_hook(
        lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    try:
        for ids in batches:
            model(input_ids=ids[None], use_cache=False)
    finally:
        h.remove()
    return torch.cat(xs).float()


def compare_transform(
    loaded, layer: str, transforms: list | str, text: str = "wiki", n_seqs: int = 4, seq_len: int = 256,
    bins: int = 80, transformed=None,
) -> InputComparison:  # fmt: skip
    """The input of `layer` in the original model and with `transforms` applied (module docstring).

    Args:
        transforms: a plan's transform list, or the name of a `PRESETS` entry.
        text, n_seqs, seq_len: calibration windows (`data.calibration_batches`, seed 0).
        transformed: the transformed LoadedModel when the caller already has it (else made here).
    Raises:
        WorkbenchError naming the layer or preset when it is unknown.
    """
    from workbench.model.data import calibration_batches
    from workbench.model.inventory import layer_inventory
    from workbench.transform.apply import apply_transforms

    if isinstance(transforms, str):
        if transforms not in PRESETS:
            raise WorkbenchError(f"unknown transform preset '{transforms}' (choose {', '.join(PRESETS)})")
        transforms = PRESETS[transforms]
    if layer not in {x.name for x in layer_inventory(loaded.model)}:
        raise WorkbenchError(f"layer '{layer}' is not a quantizable linear of {loaded.description.name}")
    batches = calibration_batches(loaded.tokenizer, text, n_seqs, seq_len, 0, loaded.description.max_context)
    t = transformed if transformed is not None else apply_transforms(loaded, list(transforms))
    before = _layer_input(loaded.model, layer, batches)
    after = _layer_input(t.model, layer, batches)
    return InputComparison(
        layer, list(transforms), _profile(before, layer, bins), _profile(after, layer, bins), before.shape[0]
    )
