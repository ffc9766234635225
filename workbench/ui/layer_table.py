"""The model view's layer table as a pure function of the plan, its prices and the layers' statistics."""

from __future__ import annotations

import pandas as pd

from workbench.progress import Progress, track

TABLE_COLUMNS = [
    "layer", "block", "role", "shape", "params", "spec", "bits", "KB", "cost", "pinned",
    "w max/med", "w kurtosis", "act outlier",
]  # fmt: skip
NAN = float("nan")


def weight_outliers(model, layers, progress: Progress = False) -> dict[str, tuple[float, float]]:
    """{layer: (max/median |w|, excess kurtosis)} of every layer (`stats.weights.outlier_summary`);
    `progress`: per layer (`workbench.progress`)."""
    from workbench.model.inventory import get_linear_weight, get_module
    from workbench.stats.weights import outlier_summary

    return {
        x.name: outlier_summary(get_linear_weight(get_module(model, x.name)))
        for x in track(layers, "weight outliers", progress, unit="layer")
    }


def _outlier_cells(name: str, outliers: dict, inspection) -> tuple[float, float, float]:
    """max/median |w|, kurtosis, and the input's largest channel absmax / median (nan: no statistics)."""
    ratio, kurt = outliers.get(name, (NAN, NAN))
    act = inspection.activations.get(name) if inspection is not None else None
    a = act.outlier_channels(1)[0][2] if act is not None else NAN
    return round(ratio, 1), round(kurt, 2), round(a, 1)


def layer_table(layers, resolved, pinned, cost, outliers: dict, inspection=None) -> pd.DataFrame:
    """One row per layer (TABLE_COLUMNS): spec, bits/weight, KB, predicted cost (nan before a scan, 4
    significant digits), pinned, and the outlier columns."""
    pins = set(pinned)
    rows = []
    for x in layers:
        spec = resolved[x.name]
        term = cost.per_layer.get(x.name) if cost is not None else None
        rows.append(
            (
                x.name,
                -1 if x.block is None else x.block,
                x.role,
                f"{x.out_features}x{x.in_features}",
                x.n_params,
                str(spec),
                round(spec.bits_per_weight(out_features=x.out_features, in_features=x.in_features), 3),
                round(spec.storage_bytes(x.out_features, x.in_features) / 1e3, 2),
                NAN if term is None else float(f"{term:.4g}"),
                x.name in pins,
                *_outlier_cells(x.name, outliers, inspection),
            )
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)
