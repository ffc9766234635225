"""Transformed candidates in the sensitivity scan: per layer a weight spec *and* an input spec, on a model
whose transforms were chosen globally; the allocator then picks one candidate per layer.

What is global and what is per layer:
    global      the transforms (a residual rotation changes every layer at once, and the online Hadamard is
                applied before every down_proj): one scan per transform set, run on the transformed copy
                (`workbench.transform.apply.apply_transforms`). Comparing sets is comparing their allocated
                plans at one budget (`allocate_over_transforms`): the set whose plan predicts the lower KL
                wins.
    per layer   a *candidate* "weight@act": the weight spec (QuantSpec grammar) and the input spec
                (quant/act.py), e.g. "int4_g128@int8_tok_sym" (W4A8) or "int8_ch_sym@int8_tok_sym" (W8A8);
                a candidate without "@" keeps the input in high precision ("int4_g128" = W4A16).
So "W4A8 with Hadamard" for one layer and "W8A8" for another is a plan with transforms [hadamard residual,
hadamard down] whose rules give the first layer int4_g128 + int8_tok_sym and the second int8_ch_sym +
int8_tok_sym. The budget counts weight storage only (an input spec costs no memory).

Costs are measured (the `kl` method of sensitivity.py, extended to inputs): mean KL(P_ref || P_q) in nats
of the whole model with only that layer's weight fake-quantized and its input fake-quantized by a
pre-hook, re-run from the layer's cached block input (`replay.BlockRunner`). P_ref is always the
*original* model's, so the tables of different transform sets share one reference and their costs add up
to comparable plan estimates. Activation quantization error is not a function of the Gram (the proxy
methods cannot see it), hence measured.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.measure.sensitivity import SensitivityTable
from workbench.model.inventory import LayerInfo
from workbench.plan.plan import Plan, Rule, plan_totals
from workbench.plan.transforms import transform_to_json
from workbench.quant.act import parse_act
from workbench.quant.spec import QuantSpec

METHOD = "kl_act"


def parse_candidate(c: str) -> tuple[QuantSpec, str | None]:
    """'weight@act' -> (weight QuantSpec, canonical act spec or None); raises WorkbenchError naming `c`."""
    if not isinstance(c, str) or c.count("@") > 1:
        raise WorkbenchError(f"candidate {c!r} must be 'weight spec' or 'weight spec@act spec'")
    w, _, a = c.partition("@")
    try:
        spec = QuantSpec.parse(w)
        act = parse_act(a) if a else None
    except WorkbenchError as exc:
        raise WorkbenchError(f"candidate {c!r}: {exc}") from None
    if not spec.is_quantized and act is None:
        raise WorkbenchError(f"candidate {c!r} quantizes nothing (bf16 costs 0 and is always allowed)")
    return spec, (str(act) if act is not None else None)


def candidate_name(c: str) -> str:
    """The canonical string of a candidate ('int4_g128_asym:rtn@int8_tok_sym' -> 'int4_g128@int8_tok_sym')."""
    spec, act = parse_candidate(c)
    return f"{spec}@{act}" if act else str(spec)


@dataclass
class TransformedScan:
    """A measured table of candidates on one transform set (`table.specs` are candidate names)."""

    transforms: list
    table: SensitivityTable

    def bits(self, layer: LayerInfo, candidate: str) -> int:
        return parse_candidate(candidate)[0].storage_bits(layer.out_features, layer.in_features)


def _act_hook(spec: str):
    from workbench.quant.act import fake_quant_act

    return lambda module, args: (fake_quant_act(args[0], spec), *args[1:])


def scan_transformed(
    loaded,
    candidates: list[str],
    transforms: list | tuple = (),
    *,
    layers: list[str] | None = None,
    text: str = "wiki",
    n_seqs: int = 2,
    seq_len: int = 256,
    seed: int = 1,
    progress: bool = True,
) -> TransformedScan:
    """Measure KL(P_ref || P_q) of every layer x candidate on `loaded` with `transforms` applied (module doc).

    Args:
        candidates: "weight@act" strings (`parse_candidate`); GPTQ/AWQ weights are not scanned (no Grams).
        transforms: the global transform set (plan version 2 entries), applied to a copy.
        layers: layer names to scan (default: every quantizable linear in a decoder block).
        text, n_seqs, seq_len, seed: scan windows (`data.calibration_batches`).
    Returns:
        TransformedScan with table.cost[layer][candidate] in nats per token.
    """
    from workbench.measure.replay import BlockRunner
    from workbench.measure.simulate import quantized_weight
    from workbench.model.data import calibration_batches
    from workbench.model.inventory import get_module, layer_inventory
    from workbench.transform.apply import apply_transforms

    names = [candidate_name(c) for c in candidates]
    for c in names:
        if parse_candidate(c)[0].algo != "rtn":
            raise WorkbenchError(f"candidate {c!r}: only RTN weights are scanned (no calibration Grams here)")
    model_l = apply_transforms(loaded, list(transforms)) if transforms else loaded
    windows = calibration_batches(
        loaded.tokenizer, text, n_seqs, seq_len, seed, loaded.description.max_context
    )
    ref = BlockRunner(loaded.model)
    ref.capture(windows)
    runner = BlockRunner(model_l.model)
    runner.capture(windows)
    runner.ref_lp = ref.ref_lp  # the original model's reference (module docstring)
    inv = layer_inventory(model_l.model)
    inv = [x for x in inv if (x.name in layers if layers is not None else runner.block_of(x) is not None)]
    settings = {"text": text, "n_seqs": n_seqs, "seq_len": seq_len, "seed": seed}
    settings["transforms"] = [transform_to_json(t) for t in transforms]
    d = model_l.description
    table = SensitivityTable(METHOD, names, inv, model={"fingerprint": d.fingerprint, "name": d.name})
    table.settings = settings
    for i, layer in enumerate(inv):
        module = get_module(model_l.model, layer.name)
        row = {}
        for c in names:
            spec, act = parse_candidate(c)
            W = quantized_weight(model_l.model, layer.name, spec) if spec.is_quantized else None
            handle = module.register_forward_pre_hook(_act_hook(act)) if act else None
            try:
                with torch.no_grad():
                    row[c] = runner.kl_from(runner.block_of(layer), {layer.name: W} if W is not None else {})
            finally:
                if handle is not None:
                    handle.remove()
        table.cost[layer.name] = row
        if progress:
            print(f"[{i + 1}/{len(inv)}] {layer.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()),
                  file=sys.stderr)  # fmt: skip
    return TransformedScan(list(transforms), table)


@dataclass
class CandidateAllocation:
    """One candidate per layer under a weight-bit budget, as a plan (with the scan's transforms)."""

    plan: Plan
    choice: dict[str, str]  # layer -> candidate name
    predicted_kl: float
    avg_bits: float
    transforms: list


def allocate_candidates(
    scan: TransformedScan, budget_bits: float, include_bf16: bool = True, extra_rules: list[Rule] = ()
) -> CandidateAllocation:
    """Choose a candidate per layer minimising the summed measured KL under `budget_bits` (exact MCKP).

    Args:
        budget_bits: average weight bits over the scanned layers; include_bf16: a layer may stay bf16
            (cost 0, input unquantized). extra_rules: appended to the plan (e.g. lm_head's).
    """
    from workbench.plan.allocate import budget_to_bits, solve_mckp

    layers, t = scan.table.layers, scan.table
    options = list(t.specs) + (["bf16"] if include_bf16 else [])
    cap = budget_to_bits(layers, budget_bits)
    costs = [[0.0 if o == "bf16" else t.cost[x.name][o] for o in options] for x in layers]
    weights = [
        [x.n_params * 16 if o == "bf16" else scan.bits(x, o) for o in options] for x in layers
    ]  # fmt: skip
    picks = solve_mckp(costs, weights, cap)
    if picks is None:
        smallest = sum(min(w) for w in weights) / sum(x.n_params for x in layers)
        raise WorkbenchError(
            f"budget {budget_bits} bits/weight is below the smallest plan of candidates "
            f"{', '.join(t.specs)} ({smallest:.3f} bits/weight)"
        )
    choice = {x.name: options[p] for x, p in zip(layers, picks)}
    rules = []
    for name, c in choice.items():
        spec, act = parse_candidate(c) if c != "bf16" else (QuantSpec.parse("bf16"), None)
        rules.append(Rule(name, str(spec), act or "none"))
    resolved = {x.name: QuantSpec.parse(r.spec) for x, r in zip(layers, rules)}
    totals = plan_totals(resolved, layers)
    predicted = float(sum(costs[i][p] for i, p in enumerate(picks)))
    meta = {"allocated_by": "workbench.sensitivity_transformed", "predicted_kl": predicted}
    plan = Plan(default="bf16", rules=rules + list(extra_rules), transforms=list(scan.transforms), meta=meta)
    return CandidateAllocation(plan, choice, predicted, totals.avg_bits, list(scan.transforms))


def allocate_over_transforms(scans: list[TransformedScan], budget_bits: float, **kw) -> CandidateAllocation:
    """The global choice: allocate on every transform set's scan, keep the plan predicting the lowest KL."""
    if not scans:
        raise WorkbenchError("no scans to choose a transform set from")
    return min((allocate_candidates(s, budget_bits, **kw) for s in scans), key=lambda a: a.predicted_kl)
