"""KV-cache sensitivity per block and side, and one budget spent on weights and cache together.

`kv_sensitivity(loaded, specs)` measures, for every attention block and side (K, V) and cache spec, the KL
(nats/token, `evaluate`) of quantizing that one side of that one block, everything else as loaded: the
measured per-layer KL scan of the sensitivity module, applied to the cache (costs assumed additive).

`allocate_joint(weight_table, kv_table, budget_mb, context)` solves one multiple-choice knapsack
(`allocate.solve_mckp`, exact) whose items are the weight layers (options: the weight table's specs, size
`QuantSpec.storage_bits`) and the cache sides (options: the kv table's specs and bf16 at cost 0, size the
exact bits of one sequence's cache side at `context` tokens, `KVSpec.cache_bytes`); the budget is weights
+ cache of one sequence at that context, in MB (10^6 bytes). Returns the version-2 plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workbench.errors import WorkbenchError
from workbench.plan.allocate import solve_mckp
from workbench.plan.kv import KVLayerSpec, head_dim_of
from workbench.plan.plan import Plan, ResolvedPlan, Rule
from workbench.quant.kvcache import KVSpec, kv_bytes
from workbench.quant.spec import QuantSpec


@dataclass
class KVSensitivity:
    """cost[(block, side)][spec] = measured KL; head_dim, n_kv_heads of the model; the settings used."""

    cost: dict[tuple[str, str], dict[str, float]]
    head_dim: int
    n_kv_heads: int
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        rows = [{"block": b, "side": s, "cost": c} for (b, s), c in self.cost.items()]
        return {
            "head_dim": self.head_dim,
            "n_kv_heads": self.n_kv_heads,
            "settings": self.settings,
            "rows": rows,
        }


def kv_sensitivity(
    loaded,
    specs: list[str],
    text: str = "wiki",
    tokens: int = 1024,
    seq_len: int = 256,
    progress: bool = False,
) -> KVSensitivity:
    """Measured KL of each (block, side, spec) alone (module docstring); len(blocks) x 2 x len(specs) runs."""
    from workbench.measure.evaluate import evaluate

    model = loaded.model
    kv_all = Plan(k=specs[0]).resolve(model).kv  # the attention blocks (validates the spec's head dim)
    cfg = model.config
    cost: dict = {}
    for block in kv_all:
        for side in ("k", "v"):
            cost[(block, side)] = {}
            for s in specs:
                spec = KVSpec.parse(s)
                reason = spec.check(head_dim_of(model), side)
                if reason:
                    continue  # e.g. _had offered: keys only
                kv = {block: KVLayerSpec(**{side: spec})}
                r = evaluate(
                    loaded,
                    ResolvedPlan({}, [], kv=kv),
                    text=text,
                    seq_len=seq_len,
                    max_tokens=tokens,
                    progress=False,
                )
                cost[(block, side)][str(spec)] = max(r.kl, 0.0)  # a KL; float noise can dip below 0
                if progress:
                    print(f"{block} {side} {spec}: KL {r.kl:.5f}", flush=True)
    settings = {"text": text, "tokens": tokens, "seq_len": seq_len, "specs": list(specs)}
    return KVSensitivity(cost, head_dim_of(model), cfg.num_key_value_heads, settings)


def allocate_joint(weight_table, kv_table: KVSensitivity, budget_mb: float, context: int) -> Plan:
    """One budget (MB: weights + one sequence's cache at `context` tokens) over weights and cache, exactly.

    weight_table: a `SensitivityTable` (layers, specs, cost[layer][spec]); bf16 is always an option at
    cost 0 (as `allocate_table(include_bf16=True)`). Raises WorkbenchError when nothing fits the budget.
    """
    if not budget_mb > 0 or context < 1:
        raise WorkbenchError(f"budget {budget_mb} MB and context {context} tokens must be positive")
    layers = weight_table.layers
    w_opts = list(dict.fromkeys([str(QuantSpec.parse(x)) for x in weight_table.specs] + ["bf16"]))
    costs, sizes, items = [], [], []
    for x in layers:
        row = weight_table.cost.get(x.name, {})
        costs.append([0.0 if s == "bf16" and s not in row else float(row[s]) for s in w_opts])
        sizes.append([QuantSpec.parse(s).storage_bits(x.out_features, x.in_features) for s in w_opts])
        items.append(("w", x.name, w_opts))
    D, H = kv_table.head_dim, kv_table.n_kv_heads
    for (block, side), row in kv_table.cost.items():
        opts = list(row) + ["bf16"]
        costs.append([row.get(s, 0.0) for s in opts])
        sizes.append([8 * kv_bytes(None if s == "bf16" else s, context, D, H) for s in opts])
        items.append((side, block, opts))
    capacity = int(budget_mb * 8e6)
    picks = solve_mckp(costs, sizes, capacity)
    if picks is None:
        smallest = sum(min(w) for w in sizes) / 8e6
        raise WorkbenchError(
            f"budget {budget_mb} MB (weights + cache at {context} tokens) is below the smallest plan "
            f"({smallest:.2f} MB)"
        )
    weights, kv = {}, {}
    total = predicted = 0.0
    for (kind, name, opts), p, c, w in zip(items, picks, costs, sizes):
        total, predicted = total + w[p], predicted + c[p]
        if kind == "w":
            weights[name] = opts[p]
        else:
            kv.setdefault(name, {})[kind] = opts[p] if opts[p] != "bf16" else "none"
    meta = {
        "allocated_by": "workbench.kvallocate",
        "budget_mb": budget_mb,
        "context": context,
        "mb": total / 8e6,
        "predicted_cost": predicted,
    }
    plan = Plan.from_resolved(weights, meta=meta)
    plan.rules += [
        Rule(f"{block}.k_proj", k=s.get("k", "none"), v=s.get("v", "none")) for block, s in kv.items()
    ]
    return plan
