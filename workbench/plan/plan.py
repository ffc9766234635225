"""Quantization plans: ordered rules mapping layers to QuantSpecs, their validation, totals and diffs.

A plan is DESIGN.md's versioned JSON:

    {"format": "workbench.plan", "version": 1, "default": "int4_g128",
     "rules": [{"match": "re:.*down_proj", "spec": "int8_ch"}, {"match": "lm_head", "spec": "bf16"}]}

Every quantizable linear layer (see `workbench.model.inventory.layer_inventory`) starts at `default`; rules
apply in
order and a later matching rule overrides an earlier one. A rule's `match` is

    an exact layer name          "model.layers.3.mlp.down_proj"
    "re:<regex>"                 Python regex, full match against the layer name
    "role:<role>"                one of inventory.ROLES (q k v o gate up down lm_head other)

`bf16` / `fp16` keep a layer in high precision.

Version 2 (written only when a plan uses it; version 1 files keep loading) adds activation quantization and
transforms:

    {"format": "workbench.plan", "version": 2, "default": "int4_g128", "act": "int8_tok",
     "rules": [{"match": "lm_head", "spec": "bf16", "act": "none"},
               {"match": "role:down", "act": "int8_tok"}],
     "transforms": [{"kind": "hadamard", "where": "residual", "seed": 0}]}

`act` (top level: every layer's default; in a rule: that rule's layers) is the layer's input spec
(`workbench.quant.act`, "none" keeps the input in high precision); a v2 rule carries `spec`, `act` or both.
`transforms` (`workbench.plan.transforms`) are applied in order to a copy of the model before its layers are
quantized; a kind this workbench cannot run is refused naming it. Version 2 also carries KV-cache specs:
top-level `k` / `v` and rule keys `k` / `v` (`workbench.plan.kv`, grammar in `workbench.quant.kvcache`),
resolved into `ResolvedPlan.kv`. Validation happens before any work and reports every problem at once in
one WorkbenchError: a rule matching no layer, a bad regex or role, an unknown spec (the rule is named),
and a spec that cannot apply to a layer (`QuantSpec.check_layer`, the layer is named).

`Plan.resolve(model_or_layers)` is the one conversion from a plan to what the rest of the workbench takes: a
`ResolvedPlan` (layer name -> QuantSpec in inventory order, plus which layers are quantized, kept and need
calibration Gram matrices). `apply_plan`, `evaluate` and the app take a ResolvedPlan and use it as it is;
a Plan or an explicit {layer: spec} handed to apply_plan / evaluate is converted once at entry
(`ResolvedPlan.of`), a plan file path never. `ResolvedPlan.from_specs(model, {layer: spec})` builds one for
an explicit set of layers (tests, one-layer experiments) with the same validation.

Totals (`plan_totals`) count every quantizable linear layer, lm_head included, with its exact storage
(`QuantSpec.storage_bits`: codes + scales + zeros). Input embeddings (and norms, biases) are NOT counted: they
are not linear layers and no plan quantizes them. A tied lm_head (shared with the input embeddings) counts
once, as the lm_head linear at its spec; when it is quantized the embedding table keeps its own high-precision
copy outside these totals. MB means 10^6 bytes; average bits per weight = total bits / total weights.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from workbench.errors import WorkbenchError
from workbench.model.inventory import ROLES, LayerInfo, layers_of
from workbench.paths import atomic_write_bytes
from workbench.plan.kv import KVLayerSpec, head_dim_of, resolve_kv
from workbench.plan.transforms import Transform, parse_transforms, transform_to_json
from workbench.quant.act import ActSpec, parse_act
from workbench.quant.spec import QuantSpec

PLAN_FORMAT = "workbench.plan"
PLAN_VERSION = 2  # the newest version this workbench reads and writes
PLAN_VERSIONS = (1, 2)
_TOP_KEYS = {1: {"format", "version", "default", "rules", "meta"}}
_TOP_KEYS[2] = _TOP_KEYS[1] | {"act", "transforms", "k", "v"}
_RULE_FIELDS = {1: {"spec"}, 2: {"spec", "act", "k", "v"}}  # besides "match"; a rule sets at least one


@dataclass
class Rule:
    """One plan rule: `match`'s layers get weight `spec`, input spec `act`, and their attention blocks the
    key / value cache specs `k` / `v` (workbench.plan.kv); None: unchanged."""

    match: str
    spec: str | None = None
    act: str | None = None
    k: str | None = None
    v: str | None = None

    def to_json(self) -> dict:
        d = {"match": self.match}
        d.update({f: getattr(self, f) for f in ("spec", "act", "k", "v") if getattr(self, f) is not None})
        return d


def _rule_from_json(r, i: int, version: int, source: str) -> Rule:
    fields = _RULE_FIELDS[version]
    ok = isinstance(r, dict) and "match" in r and set(r) - {"match"} <= fields and len(r) > 1
    if not ok or not all(isinstance(v, str) for v in r.values()):
        shape = '{"match": str, "spec": str}' if version == 1 else '{"match": str} + spec / act / k / v: str'
        raise WorkbenchError(f"{source}: rule {i} must be {shape}, got {r!r}")
    return Rule(r["match"], r.get("spec"), r.get("act"), r.get("k"), r.get("v"))


def _matcher(match: str):
    """A predicate on layers for a `match` string; raises ValueError with the reason when malformed."""
    if match.startswith("re:"):
        try:
            rx = re.compile(match[3:])
        except re.error as exc:
            raise ValueError(f"bad regex ({exc})") from None
        return lambda layer: rx.fullmatch(layer.name) is not None
    if match.startswith("role:"):
        role = match[5:]
        if role not in ROLES:
            raise ValueError(f"unknown role '{role}' (roles: {', '.join(ROLES)})")
        return lambda layer: layer.role == role
    return lambda layer: layer.name == match


def match_layers(match: str, layers: Iterable[LayerInfo]) -> list[str]:
    """Names of the layers selected by a `match` string (exact name, `re:` or `role:`).

    Raises:
        WorkbenchError: malformed regex or unknown role.
    """
    try:
        pred = _matcher(match)
    except ValueError as exc:
        raise WorkbenchError(f"match '{match}': {exc}") from None
    return [layer.name for layer in layers if pred(layer)]


@dataclass
class Plan:
    """Default spec plus ordered rules (later rules win). `meta` is free-form provenance (e.g. allocation)."""

    default: str = "bf16"
    rules: list[Rule] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    act: str | None = None  # every layer's default input spec (version 2); None: high precision
    transforms: list[Transform] = field(default_factory=list)  # version 2
    k: str | None = None  # every attention block's key cache spec (version 2, workbench.plan.kv)
    v: str | None = None  # every attention block's value cache spec (version 2)

    # ------------------------------------------------------------------ JSON
    @property
    def version(self) -> int:
        """The lowest plan version that holds this plan (2 when it has act specs or transforms)."""
        v2 = self.act is not None or self.transforms or self.k is not None or self.v is not None
        v2 = v2 or any(r.act is not None or r.k is not None or r.v is not None for r in self.rules)
        return 2 if v2 else 1

    def to_json(self) -> dict:
        d = {"format": PLAN_FORMAT, "version": self.version, "default": self.default}
        d.update({f: getattr(self, f) for f in ("act", "k", "v") if getattr(self, f) is not None})
        d["rules"] = [r.to_json() for r in self.rules]
        if self.transforms:
            d["transforms"] = [transform_to_json(t) for t in self.transforms]
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_json(cls, d: dict, source: str = "plan") -> Plan:
        """Build a plan from its JSON object; refuses other formats, unknown versions and malformed fields.

        Spec strings and matches are checked later by `validate` (so all their errors are reported together).
        """
        if not isinstance(d, dict):
            raise WorkbenchError(f"{source}: a plan is a JSON object, got {type(d).__name__}")
        if d.get("format") != PLAN_FORMAT:
            raise WorkbenchError(
                f"{source}: not a workbench plan (format tag {d.get('format')!r}, expected '{PLAN_FORMAT}')"
            )
        version = d.get("version")
        if version not in PLAN_VERSIONS or isinstance(version, bool):
            raise WorkbenchError(
                f"{source}: plan version {version!r} is not supported (this workbench reads "
                f"versions {', '.join(map(str, PLAN_VERSIONS))}; upgrade the workbench or rewrite the plan)"
            )
        extra = sorted(set(d) - _TOP_KEYS[version])
        if extra:
            raise WorkbenchError(
                f"{source}: unknown plan key(s) {', '.join(map(repr, extra))} (allowed in version "
                f"{version}: {', '.join(sorted(_TOP_KEYS[version]))})"
            )
        default = d.get("default", "bf16")
        if not isinstance(default, str):
            raise WorkbenchError(f"{source}: 'default' must be a spec string, got {default!r}")
        rules_in = d.get("rules", [])
        if not isinstance(rules_in, list):
            raise WorkbenchError(f"{source}: 'rules' must be a list")
        rules = [_rule_from_json(r, i, version, source) for i, r in enumerate(rules_in, 1)]
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise WorkbenchError(f"{source}: 'meta' must be an object")
        for key in ("act", "k", "v"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise WorkbenchError(f"{source}: '{key}' must be a spec string, got {d[key]!r}")
        transforms = parse_transforms(d.get("transforms", []), source)
        return cls(default, rules, meta, d.get("act"), transforms, d.get("k"), d.get("v"))

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), (json.dumps(self.to_json(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise WorkbenchError(f"plan file {path} not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise WorkbenchError(f"plan file {path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
        return cls.from_json(d, source=f"plan file {path}")

    # ------------------------------------------------------------------ resolution
    def _problems_and_resolution(
        self, layers: list[LayerInfo]
    ) -> tuple[list[str], dict[str, QuantSpec], dict[str, ActSpec]]:
        problems: list[str] = []
        specs: dict[str, QuantSpec | None] = {}

        def parse(s: str, where: str) -> QuantSpec | None:
            if s not in specs:
                try:
                    specs[s] = QuantSpec.parse(s)
                except WorkbenchError as exc:
                    problems.append(f"{where}: {exc}")
                    specs[s] = None
            return specs[s]

        chosen: dict[str, tuple[QuantSpec | None, str]] = {}
        self._matched: dict[int, list[str]] = {}
        default = parse(self.default, f"default spec '{self.default}'")
        act_default = _parse_act(self.act, "default act", problems)
        acts = {layer.name: (act_default, "default act") for layer in layers}
        for layer in layers:
            chosen[layer.name] = (default, "default")
        for i, rule in enumerate(self.rules, 1):
            where = f"rule {i} (match '{rule.match}')"
            spec = parse(rule.spec, where) if rule.spec is not None else None
            act = _parse_act(rule.act, where, problems)
            try:
                names = match_layers(rule.match, layers)
            except WorkbenchError as exc:
                problems.append(f"{where}: {str(exc).split(': ', 1)[-1]}")
                continue
            self._matched[i] = names
            if not names:
                problems.append(f"{where} matches no layer")
            for name in names:
                if rule.spec is not None:
                    chosen[name] = (spec, f"rule {i}")
                if rule.act is not None:
                    acts[name] = (act, f"rule {i}")
        problems += self._transform_problems(layers)
        resolved: dict[str, QuantSpec] = {}
        for layer in layers:
            spec, origin = chosen[layer.name]
            if spec is None:
                continue  # its unknown spec is already reported
            reason = spec.check_layer(layer.out_features, layer.in_features)
            if reason:
                problems.append(f"layer {layer.name}: {spec} ({origin}) cannot apply: {reason}")
            else:
                resolved[layer.name] = spec
        resolved_acts = {}
        for layer in layers:
            act, origin = acts[layer.name]
            reason = act.check_layer(layer.in_features) if act is not None else None
            if reason:
                problems.append(f"layer {layer.name}: act {act} ({origin}) cannot apply: {reason}")
            elif act is not None:
                resolved_acts[layer.name] = act
        return problems, resolved, resolved_acts

    def _transform_problems(self, layers: list[LayerInfo]) -> list[str]:
        out = []
        for i, t in enumerate(self.transforms, 1):
            if t.kind == "smooth":
                try:
                    if not match_layers(t.match, layers):
                        out.append(f"transform {i} (smooth, match '{t.match}') matches no layer")
                except WorkbenchError as exc:
                    out.append(f"transform {i} (smooth): {exc}")
        return out

    def _all(self, model_or_layers):
        layers = layers_of(model_or_layers)
        problems, resolved, acts = self._problems_and_resolution(layers)
        head_dim = None if isinstance(model_or_layers, (list, tuple)) else head_dim_of(model_or_layers)
        kv_problems, kv = resolve_kv(self, layers, head_dim, self._matched.get)
        return layers, problems + kv_problems, resolved, acts, kv

    def validate(self, model_or_layers) -> None:
        """Raise one WorkbenchError listing every problem of this plan against a model's layers."""
        _raise_problems(self._all(model_or_layers)[1])

    def resolve(self, model_or_layers) -> ResolvedPlan:
        """One QuantSpec per layer of a model (or a list of LayerInfo), in inventory order; validates first.

        The one conversion from a Plan: everything downstream (apply_plan, evaluate, the app) takes it.
        """
        layers, problems, resolved, acts, kv = self._all(model_or_layers)
        _raise_problems(problems)
        return ResolvedPlan(resolved, layers, acts=acts, transforms=self.transforms, kv=kv)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_resolved(cls, resolved: dict[str, QuantSpec | str], meta: dict | None = None) -> Plan:
        """The shortest exact-name plan for a resolution: the most common spec becomes the default."""
        as_str = {name: str(QuantSpec.parse(s)) for name, s in resolved.items()}
        if not as_str:
            return cls(meta=dict(meta or {}))
        default = Counter(as_str.values()).most_common(1)[0][0]
        rules = [Rule(name, s) for name, s in as_str.items() if s != default]
        return cls(default=default, rules=rules, meta=dict(meta or {}))


def _parse_act(s: str | None, where: str, problems: list[str]) -> ActSpec | None:
    try:
        return parse_act(s)
    except WorkbenchError as exc:
        problems.append(f"{where}: {exc}")
        return None


def _raise_problems(problems: list[str]) -> None:
    if problems:
        n = len(problems)
        raise WorkbenchError(f"plan has {n} problem{'s' if n > 1 else ''}: " + "; ".join(problems))


class ResolvedPlan(dict):
    """layer name -> QuantSpec for the layers of one model, in inventory order: a plan after `Plan.resolve`.

    A dict (so `resolved[name]`, `.items()` and `==` with a plain dict work), read as immutable, plus the
    layers it was resolved against (`layers`: LayerInfo of the named layers, inventory order), the input
    specs of the layers whose input is quantized (`acts`: layer -> ActSpec), the plan's `transforms` and the
    cache specs of the attention blocks whose K or V cache is quantized (`kv`: module -> KVLayerSpec).
    """

    def __init__(
        self,
        specs: dict[str, QuantSpec],
        layers: list[LayerInfo],
        acts: dict[str, ActSpec] | None = None,
        transforms: list[Transform] | tuple = (),
        kv: dict[str, KVLayerSpec] | None = None,
    ):
        super().__init__((x.name, specs[x.name]) for x in layers if x.name in specs)
        self.layers: list[LayerInfo] = [x for x in layers if x.name in specs]
        self.acts: dict[str, ActSpec] = {x.name: acts[x.name] for x in layers if x.name in (acts or {})}
        self.transforms: tuple[Transform, ...] = tuple(transforms)
        self.kv: dict[str, KVLayerSpec] = dict(kv or {})  # attention module -> its cache specs

    @classmethod
    def from_specs(cls, model_or_layers, specs: Mapping[str, QuantSpec | str]) -> ResolvedPlan:
        """A resolution of exactly the named layers ({layer: spec}); others are left out (not touched).

        Raises one WorkbenchError listing every unknown layer, unknown spec and spec that cannot apply.
        """
        layers = {x.name: x for x in layers_of(model_or_layers)}
        problems, parsed = [], {}
        for name, s in specs.items():
            if name not in layers:
                problems.append(f"layer {name} is not a quantizable linear of the model")
                continue
            try:
                spec = QuantSpec.parse(s)
            except WorkbenchError as exc:
                problems.append(f"layer {name}: {exc}")
                continue
            reason = spec.check_layer(layers[name].out_features, layers[name].in_features)
            if reason:
                problems.append(f"layer {name}: {spec} cannot apply: {reason}")
            parsed[name] = spec
        _raise_problems(problems)
        return cls(parsed, list(layers.values()))

    @classmethod
    def of(cls, model_or_layers, plan) -> ResolvedPlan:
        """`plan` as a ResolvedPlan of a model's layers, at the boundary of apply_plan / evaluate.

        A ResolvedPlan is returned as it is (never re-validated), a Plan goes through `Plan.resolve`, an
        explicit {layer: spec} through `from_specs`. Anything else (a plan file path) is refused.
        """
        if isinstance(plan, ResolvedPlan):
            return plan
        if isinstance(plan, Plan):
            return plan.resolve(model_or_layers)
        if isinstance(plan, Mapping):
            return cls.from_specs(model_or_layers, plan)
        raise WorkbenchError(
            f"expected a ResolvedPlan (plan.resolve(model)), a Plan or a {{layer: spec}} dict, got "
            f"{type(plan).__name__} (load a plan file with Plan.load first)"
        )

    @property
    def quantized(self) -> list[str]:
        """Layers whose spec stores low-bit codes (they become QuantLinear modules)."""
        return [n for n, s in self.items() if s.is_quantized]

    @property
    def kept(self) -> list[str]:
        """Layers kept in high precision (bf16 / fp16 specs)."""
        return [n for n, s in self.items() if not s.is_quantized]

    @property
    def gram_layers(self) -> list[str]:
        """Layers whose algorithm needs calibration Gram matrices X^T X (gptq, awq)."""
        return [n for n, s in self.items() if s.needs_gram]


# ---------------------------------------------------------------------- totals and diff
@dataclass
class PlanTotals:
    """Storage of a resolved plan over all quantizable linears (embeddings not counted; see module doc)."""

    n_layers: int
    n_weights: int
    total_bits: int
    mb: float  # total_bits / 8 / 1e6
    avg_bits: float  # total_bits / n_weights
    bf16_mb: float  # the same layers all kept in bf16
    by_spec: dict[str, int]  # spec string -> weights stored with it

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def summary(self) -> str:
        parts = ", ".join(
            f"{s}: {100 * n / self.n_weights:.1f}%"
            for s, n in sorted(self.by_spec.items(), key=lambda kv: -kv[1])
        )
        return (
            f"{self.mb:.2f} MB ({self.avg_bits:.3f} bits/weight over {self.n_layers} linear layers, "
            f"{self.n_weights / 1e6:.1f}M weights; bf16 {self.bf16_mb:.2f} MB; embeddings not counted) "
            f"[{parts}]"
        )


def plan_totals(resolved: dict[str, QuantSpec], layers: list[LayerInfo]) -> PlanTotals:
    """Exact size of `resolved` over `layers`; every layer must be resolved."""
    missing = [x.name for x in layers if x.name not in resolved]
    if missing:
        raise WorkbenchError(f"plan resolves no spec for layer {missing[0]} ({len(missing)} missing)")
    total = n = 0
    by_spec: Counter = Counter()
    for layer in layers:
        spec = QuantSpec.parse(resolved[layer.name])
        total += spec.storage_bits(layer.out_features, layer.in_features)
        n += layer.n_params
        by_spec[str(spec)] += layer.n_params
    return PlanTotals(
        n_layers=len(layers),
        n_weights=n,
        total_bits=total,
        mb=total / 8e6,
        avg_bits=total / n if n else 0.0,
        bf16_mb=16 * n / 8e6,
        by_spec=dict(by_spec),
    )


@dataclass
class LayerChange:
    """A layer whose spec differs between two plans."""

    layer: str
    old: str
    new: str


def plan_diff(old: dict[str, QuantSpec], new: dict[str, QuantSpec]) -> list[LayerChange]:
    """Per-layer changes old -> new between two resolutions (layers missing on one side show as '-')."""
    names = list(old) + [n for n in new if n not in old]
    out = []
    for name in names:
        a = str(old[name]) if name in old else "-"
        b = str(new[name]) if name in new else "-"
        if a != b:
            out.append(LayerChange(name, a, b))
    return out
