"""Editing plans the way a person does: set one layer, set a group of layers, price the result.

These are the plan operations behind the app's plan editor (and usable from notebooks). Each returns a NEW
`Plan` and leaves the input untouched:

- `with_rule(plan, layers, match, spec)` appends a rule (exact name, `re:` or `role:`) and drops earlier
  rules that the new one fully overrides (every layer they select is selected by the new rule), so a plan
  edited by hand for an hour stays short and readable. The resolution is exactly that of appending the rule.
- `with_layer_spec(plan, layers, name, spec)` sets one layer: removes its earlier exact-name rule and adds
  a new one only when the layer would otherwise resolve to something else.
- `predicted_cost(table, resolved)` prices a resolution with a sensitivity table (cost[layer][spec],
  assumed additive over layers, as the allocator assumes): the total and each layer's term. A layer kept
  in bf16/fp16 costs 0 unless the table measured it; a spec the table lacks gives None for that layer and
  makes the total None (unknown), never a silent 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.errors import WorkbenchError
from workbench.model.inventory import LayerInfo
from workbench.plan.plan import Plan, Rule, match_layers
from workbench.quant.spec import QuantSpec


def _canonical(spec: str | QuantSpec) -> str:
    return str(QuantSpec.parse(spec))


def with_rule(plan: Plan, layers: list[LayerInfo], match: str, spec: str | QuantSpec) -> Plan:
    """`plan` plus the rule `match -> spec` at the end, minus the earlier rules it fully overrides.

    Raises:
        WorkbenchError: unknown spec, malformed match, or a match that selects no layer (named).
    """
    spec = _canonical(spec)
    selected = set(match_layers(match, layers))
    if not selected:
        raise WorkbenchError(f"'{match}' matches no layer of this model")
    kept = []
    for rule in plan.rules:
        try:
            theirs = set(match_layers(rule.match, layers))
        except WorkbenchError:
            theirs = set()
        if theirs and theirs <= selected and rule.act is None and rule.k is None and rule.v is None:
            continue  # every layer it selects is overridden by the new rule (a rule with act / k / v stays)
        kept.append(Rule(rule.match, rule.spec, rule.act, rule.k, rule.v))
    kept.append(Rule(match, spec))
    return Plan(default=plan.default, rules=kept, meta=_edited_meta(plan), **_v2(plan))


def with_layer_spec(plan: Plan, layers: list[LayerInfo], name: str, spec: str | QuantSpec) -> Plan:
    """`plan` with layer `name` set to `spec` (one exact-name rule at most, none when redundant)."""
    spec = _canonical(spec)
    if name not in {x.name for x in layers}:
        raise WorkbenchError(f"layer '{name}' is not a quantizable layer of this model")
    rules = [Rule(r.match, r.spec, r.act, r.k, r.v) for r in plan.rules if r.match != name or r.spec is None]
    base = Plan(default=plan.default, rules=rules)
    if str(base.resolve(layers)[name]) != spec:
        rules.append(Rule(name, spec))
    return Plan(default=plan.default, rules=rules, meta=_edited_meta(plan), **_v2(plan))


def with_default(plan: Plan, spec: str | QuantSpec) -> Plan:
    """`plan` with another default spec (rules unchanged)."""
    return Plan(
        default=_canonical(spec),
        rules=[Rule(r.match, r.spec, r.act, r.k, r.v) for r in plan.rules],
        meta=_edited_meta(plan),
        **_v2(plan),
    )


def default_reach(plan: Plan, layers: list[LayerInfo]) -> int:
    """How many layers take the plan's default spec (no rule selects them)."""
    ruled = {n for r in plan.rules for n in match_layers(r.match, layers)}
    return sum(1 for x in layers if x.name not in ruled)


def without_rule(plan: Plan, index: int) -> Plan:
    """`plan` without its rule number `index` (0-based)."""
    if not 0 <= index < len(plan.rules):
        raise WorkbenchError(f"the plan has no rule {index + 1} (it has {len(plan.rules)})")
    rules = [Rule(r.match, r.spec, r.act, r.k, r.v) for i, r in enumerate(plan.rules) if i != index]
    return Plan(default=plan.default, rules=rules, meta=_edited_meta(plan), **_v2(plan))


def _v2(plan: Plan) -> dict:
    """The version-2 parts of a plan (act and KV defaults, transforms) that an edit of weight specs keeps."""
    return {"act": plan.act, "transforms": list(plan.transforms), "k": plan.k, "v": plan.v}


def _edited_meta(plan: Plan) -> dict:
    """Provenance after a hand edit: an allocator's prediction no longer describes the plan."""
    meta = dict(plan.meta)
    if "allocated_by" in meta:
        meta = {"edited_from": meta.get("allocated_by"), "budget_avg_bits": meta.get("budget_avg_bits")}
    return meta


@dataclass
class PlanCost:
    """Predicted cost of a resolution: `total` (None when any layer is unpriced) and each layer's term."""

    total: float | None
    per_layer: dict[str, float | None]
    unpriced: list[str]


def predicted_cost(table, resolved: dict[str, QuantSpec]) -> PlanCost:
    """Price `resolved` with a sensitivity table (`table.cost[layer][spec]`, additive over layers)."""
    per: dict[str, float | None] = {}
    unpriced: list[str] = []
    for name, spec in resolved.items():
        s = str(spec)
        row = table.cost.get(name, {})
        if s in row and row[s] is not None:
            per[name] = float(row[s])
        elif not QuantSpec.parse(s).is_quantized:
            per[name] = 0.0
        else:
            per[name] = None
            unpriced.append(name)
    total = None if unpriced else sum(v for v in per.values())
    return PlanCost(total=total, per_layer=per, unpriced=unpriced)


def with_kv(plan, k: str | None, v: str | None):
    """A copy of `plan` whose every attention block stores keys by `k` and values by `v` ('none'/None: bf16).

    Rules that set `k` / `v` are dropped (the new defaults reach every block); specs are checked first.
    """
    import copy

    from workbench.quant.kvcache import parse_kv

    k, v = (None if s in (None, "", "none") else str(parse_kv(s)) for s in (k, v))
    new = copy.deepcopy(plan)
    new.k, new.v = k, v
    rules = []
    for r in new.rules:
        if r.k is not None or r.v is not None:
            if r.spec is None and r.act is None:
                continue
            r = Rule(r.match, r.spec, r.act)
        rules.append(r)
    new.rules = rules
    return new
