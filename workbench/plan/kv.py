"""KV-cache part of a plan (version 2): which attention block stores its keys and values how.

A plan's top-level `k` / `v` is every attention block's key / value cache spec (`workbench.quant.kvcache`);
a rule's `k` / `v` applies to the attention block of every layer the rule matches (a layer of
`model.layers.3` selects block 3, so `{"match": "role:k", "k": "int4_ch_r32"}` sets every block's keys and
`{"match": "re:model\\.layers\\.3\\..*", "v": "none"}` block 3's values). Later rules win, as for weights.
A rule that sets `k` / `v` but matches no layer of a block, and a spec that cannot store a head of the
model's head dimension, are plan problems (the block is named).

`resolve_kv` returns {attention module name: KVLayerSpec}, only blocks with a quantized side, in block order;
`kv_cache_bytes` is the exact cache size of a model at a context length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workbench.errors import WorkbenchError
from workbench.model.inventory import LayerInfo
from workbench.quant.kvcache import KVSpec, kv_bytes, parse_kv

_BLOCK_PREFIX = re.compile(r"^(?P<prefix>.*\.(?:layers|h|blocks)\.\d+)\.")


@dataclass(frozen=True)
class KVLayerSpec:
    """The key and value cache specs of one attention block (None: that side stays bf16)."""

    k: KVSpec | None = None
    v: KVSpec | None = None

    def to_json(self) -> dict:
        return {"k": str(self.k) if self.k else "none", "v": str(self.v) if self.v else "none"}


def attention_of(layer: LayerInfo) -> str | None:
    """The attention module name of a layer's block ('model.layers.3.self_attn'), None outside blocks."""
    m = _BLOCK_PREFIX.match(layer.name)
    return f"{m['prefix']}.self_attn" if m else None


def head_dim_of(model) -> int | None:
    """The attention head dimension from a model's config (None when the model has none)."""
    cfg = getattr(getattr(model, "model", model), "config", None) or getattr(model, "config", None)
    if cfg is None:
        return None
    hd = getattr(cfg, "head_dim", None)
    return hd or cfg.hidden_size // cfg.num_attention_heads


def _parse(s: str | None, where: str, problems: list[str]) -> KVSpec | None:
    try:
        return parse_kv(s)
    except WorkbenchError as exc:
        problems.append(f"{where}: {exc}")
        return None


def resolve_kv(plan, layers: list[LayerInfo], head_dim: int | None, rule_layers) -> tuple[list[str], dict]:
    """(problems, {attention module: KVLayerSpec}) of `plan`'s `k` / `v` (top level and rules).

    rule_layers(i) -> the layer names rule i matches (None when its match is malformed, already reported).
    """
    problems: list[str] = []
    blocks = list(dict.fromkeys(a for a in map(attention_of, layers) if a))
    if plan.k is None and plan.v is None and not any(r.k or r.v for r in plan.rules):
        return problems, {}
    chosen = {
        b: {"k": _parse(plan.k, "default k", problems), "v": _parse(plan.v, "default v", problems)}
        for b in blocks
    }
    by_name = {x.name: x for x in layers}
    for i, rule in enumerate(plan.rules, 1):
        if rule.k is None and rule.v is None:
            continue
        where = f"rule {i} (match '{rule.match}')"
        names = rule_layers(i)
        if names is None:
            continue
        targets = list(dict.fromkeys(a for a in (attention_of(by_name[n]) for n in names) if a))
        if names and not targets:
            problems.append(f"{where} sets a KV-cache spec but matches no layer of an attention block")
        for side in ("k", "v"):
            s = getattr(rule, side)
            if s is not None:
                spec = _parse(s, where, problems)
                for b in targets:
                    chosen[b][side] = spec
    out = {}
    for b in blocks:
        for side in ("k", "v"):
            spec = chosen[b][side]
            reason = spec.check(head_dim, side) if spec is not None and head_dim else None
            if reason:
                problems.append(f"{b}: {side} cache spec {spec} cannot apply: {reason}")
        if chosen[b]["k"] is not None or chosen[b]["v"] is not None:
            out[b] = KVLayerSpec(chosen[b]["k"], chosen[b]["v"])
    return problems, out


def check_context(kv: dict[str, KVLayerSpec], context: int) -> None:
    """Refuse a residual window that is not shorter than the context (nothing would be quantized)."""
    for name, spec in kv.items():
        for side, s in (("k", spec.k), ("v", spec.v)):
            if s is not None and s.residual >= context:
                raise WorkbenchError(
                    f"{name}: {side} cache spec {s} keeps a residual window of {s.residual} tokens, not "
                    f"shorter than the context of {context} tokens (nothing would be quantized)"
                )


def kv_cache_bytes(
    kv: dict[str, KVLayerSpec], blocks: list[str], context: int, head_dim: int, n_kv_heads: int
) -> int:
    """Exact bytes of one sequence's KV cache at `context` tokens over `blocks` (bf16 where no spec)."""
    total = 0
    for b in blocks:
        spec = kv.get(b, KVLayerSpec())
        total += kv_bytes(spec.k, context, head_dim, n_kv_heads) + kv_bytes(
            spec.v, context, head_dim, n_kv_heads
        )
    return total


def plan_cache_bytes(model, kv: dict[str, KVLayerSpec], context: int) -> tuple[int, int]:
    """(bytes of one sequence's cache at `context` tokens with `kv`, the same cache in bf16) for a model."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise WorkbenchError(f"{type(model).__name__} has no config: cannot size its KV cache")
    blocks = [f"model.layers.{i}.self_attn" for i in range(cfg.num_hidden_layers)]
    D, H = head_dim_of(model), cfg.num_key_value_heads
    return kv_cache_bytes(kv, blocks, context, D, H), kv_cache_bytes({}, blocks, context, D, H)
