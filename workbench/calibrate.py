"""Calibrating a sensitivity table on measured whole plans: one scale per spec, from its uniform plan.

A Fisher-weighted cost is a second-order estimate of the KL of quantizing one layer alone. Summed over
layers it ranks plans of one spec well, but its error depends on the spec: small perturbations (int8, int6,
4-bit) are over-estimated, large ones (3-bit, 2-bit) under-estimated, since KL grows faster than quadratically
once the error is large. An allocator fed such a table prefers the under-estimated specs, and a mixed plan
can then measure worse than the uniform plan of the same size (see benchmarks/RESULTS.md, "Plans you can
trust").

`calibrate_table` measures the KL of the uniform plan of every spec on the scan windows (one forward pass
each, all layers fake-quantized, from the cached reference of `replay.BlockRunner`) and multiplies that
spec's costs by measured / predicted. The table then predicts every uniform plan exactly (on those windows),
and mixed plans are priced in the same currency.
"""

from __future__ import annotations

import torch


def uniform_kls(loaded, table, windows: torch.Tensor, grams: dict, on_spec=None) -> dict[str, float]:
    """{spec: mean KL(P_ref || P_q)} of the uniform plan of each table spec on `windows` [n, L].

    Specs that cannot apply to every layer are left out. `on_spec(i, n, spec)` is called before each.
    """
    from workbench.errors import WorkbenchError
    from workbench.plan import Plan
    from workbench.replay import BlockRunner
    from workbench.simulate import quantized_weight

    runner = BlockRunner(loaded.model)
    runner.capture(windows)
    out = {}
    for i, spec in enumerate(table.specs):
        if on_spec is not None:
            on_spec(i, len(table.specs), spec)
        try:
            resolved = Plan(default=spec).resolve(table.layers)
        except WorkbenchError:
            continue
        weights = {n: quantized_weight(loaded.model, n, s, grams) for n, s in resolved.items()}
        out[spec] = runner.kl_from(0, weights)
    return out


def calibrate_table(loaded, table, windows: torch.Tensor, grams: dict, on_spec=None) -> dict:
    """Scale each spec's costs in `table` (in place) so that its uniform plan's summed cost equals the KL
    measured on `windows`; returns {spec: {"measured", "predicted", "scale"}} (the record kept in the
    table's settings)."""
    measured = uniform_kls(loaded, table, windows, grams, on_spec)
    record = {}
    for spec, kl in measured.items():
        predicted = sum(table.cost[x.name][spec] for x in table.layers)
        scale = kl / predicted if predicted > 0 else 1.0
        record[spec] = {"measured": kl, "predicted": predicted, "scale": scale}
        for x in table.layers:
            table.cost[x.name][spec] *= scale
    return record
