"""Prediction beside measurement: measure a plan and the uniform plans next to it in size.

The allocator minimises a *predicted* cost (the sensitivity table summed over layers). `verify_plan` checks
that prediction where it matters: it evaluates the plan and the uniform plans of the table's specs that are
nearest to it in size (the largest that fit in the plan's size, and the smallest above it), and reports
predicted cost, measured KL, perplexity and top-1 side by side, plus a verdict: does the plan measure
lower KL than every uniform plan that fits in its size? Each evaluation is cached on disk (model
fingerprint, plan, evaluation settings), so re-verifying after an undo costs nothing.

`workbench allocate --verify` prints it; the app's Sensitivity tab puts the measured points on the Pareto
chart.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

from workbench.errors import WorkbenchError
from workbench.model.inventory import LayerInfo
from workbench.paths import atomic_write_bytes, cache_dir
from workbench.plan.plan import Plan, plan_totals
from workbench.quant.spec import QuantSpec


@dataclass
class PlanCheck:
    """One measured plan: its size, the table's prediction and the measured quality."""

    label: str
    kind: str  # "plan" | "uniform"
    avg_bits: float
    mb: float
    predicted: float  # summed table cost (nan when a layer's spec is not in the table)
    kl: float  # mean KL(P_ref || P_q), nats per token
    ppl: float
    top1: float
    fits: bool  # uniform plans: no larger than the checked plan
    cached: bool = False


@dataclass
class Verification:
    """The checked plan and its uniform neighbours, with the evaluation settings."""

    method: str
    text: str
    seq_len: int
    n_tokens: int
    ref_ppl: float
    rows: list[PlanCheck] = field(default_factory=list)

    @property
    def plan(self) -> PlanCheck:
        return next(r for r in self.rows if r.kind == "plan")

    def beaten_by(self) -> list[PlanCheck]:
        """Uniform plans that fit in the plan's size and measure lower KL than it."""
        p = self.plan
        return [r for r in self.rows if r.kind == "uniform" and r.fits and r.kl < p.kl]

    def verdict(self) -> str:
        """One line: whether the plan beats every measured uniform plan that fits in its size."""
        fitting = [r for r in self.rows if r.kind == "uniform" and r.fits]
        if not fitting:
            return "no uniform plan of the table's specs fits in this plan's size"
        beaten = self.beaten_by()
        if beaten:
            names = ", ".join(f"{r.label} (KL {r.kl:.4g})" for r in beaten)
            return (
                f"WARNING: uniform plans that fit measure lower KL than this plan ({self.plan.kl:.4g}): "
                f"{names}"
            )
        names = ", ".join(r.label for r in fitting)
        return f"the plan measures KL no higher than every uniform plan that fits ({names})"

    def to_json(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict()
        return d


def predicted_cost(table, resolved: dict[str, QuantSpec]) -> float:
    """The table's summed cost of a plan (`planedit.predicted_cost`); nan when a spec was not scanned."""
    from workbench.plan.edit import predicted_cost as price

    total = price(table, resolved).total
    return math.nan if total is None else total


def uniform_plans(table, layers: list[LayerInfo]) -> dict[str, dict[str, QuantSpec]]:
    """{spec: resolved uniform plan} for every table spec that applies to every layer."""
    out = {}
    for s in table.specs:
        try:
            out[s] = Plan(default=s).resolve(layers)
        except WorkbenchError:
            continue  # a spec that cannot apply to some layer has no uniform plan
    return out


def neighbours(table, layers: list[LayerInfo], total_bits: int, below: int = 1, above: int = 1) -> list[str]:
    """The uniform specs nearest to `total_bits` in size: `below` that fit, `above` larger ones. Of specs
    of the same size (nf4_g64 and mxfp4 on `default`) the one with the lowest predicted cost comes first:
    the plan is compared with its strongest neighbour, not the first name in alphabetical order."""
    uniforms = uniform_plans(table, layers)
    rank = {s: (plan_totals(r, layers).total_bits, predicted_cost(table, r)) for s, r in uniforms.items()}
    fit = sorted((b, -c, s) for s, (b, c) in rank.items() if b <= total_bits)  # nearest, strongest last
    big = sorted((b, c, s) for s, (b, c) in rank.items() if b > total_bits)  # nearest, strongest first
    return [s for *_, s in fit[len(fit) - below :] if below] + [s for *_, s in big[:above]]


def _eval_key(loaded, resolved, text, seq_len, max_tokens, grams_tag) -> str:
    plan = sorted((n, str(s)) for n, s in resolved.items())
    ident = [loaded.description.fingerprint, plan, text, seq_len, max_tokens, grams_tag, 1]
    return hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:20]


def measure(
    loaded,
    resolved: dict[str, QuantSpec],
    text: str,
    seq_len: int,
    max_tokens: int,
    grams=None,
    grams_tag: str = "",
    use_cache: bool = True,
) -> tuple[dict, bool]:
    """`evaluate` of a plan, cached as JSON in cache_dir("verify"); returns (EvalResult dict, from cache)."""
    from workbench.measure.evaluate import evaluate

    path = cache_dir("verify") / f"{_eval_key(loaded, resolved, text, seq_len, max_tokens, grams_tag)}.json"
    if use_cache and path.is_file():
        return json.loads(path.read_text()), True
    r = evaluate(
        loaded, resolved, text=text, seq_len=seq_len, max_tokens=max_tokens, grams=grams, progress=False
    ).to_json()
    if use_cache:
        atomic_write_bytes(path, json.dumps(r).encode())
    return r, False


def verify_plan(
    loaded,
    table,
    resolved: dict[str, QuantSpec],
    *,
    text: str = "wikitext2",
    seq_len: int = 512,
    max_tokens: int = 4096,
    below: int = 1,
    above: int = 1,
    grams=None,
    grams_tag: str = "",
    use_cache: bool = True,
    on_step=None,
) -> Verification:
    """Measure `resolved` and the uniform plans next to it in size (see module doc).

    Args:
        table: the SensitivityTable the plan was allocated from (layers, specs, predicted costs).
        resolved: {layer: QuantSpec} of the plan to check.
        text, seq_len, max_tokens: the evaluation (`evaluate`); quick by default.
        below / above: how many uniform plans to measure that fit in the plan's size / that are larger.
        grams, grams_tag: Gram matrices for gptq/awq layers and a string naming their calibration (cache key).
        on_step: callback(i, n, label) before each evaluation (progress).
    """
    layers = table.layers
    totals = plan_totals(resolved, layers)
    specs = neighbours(table, layers, totals.total_bits, below, above)
    uniforms = uniform_plans(table, layers)
    todo = [("this plan", "plan", resolved)] + [(f"uniform {s}", "uniform", uniforms[s]) for s in specs]
    out = None
    for i, (label, kind, res) in enumerate(todo):
        if on_step is not None:
            on_step(i, len(todo), label)
        r, cached = measure(loaded, res, text, seq_len, max_tokens, grams, grams_tag, use_cache)
        t = plan_totals(res, layers)
        if out is None:
            out = Verification(table.method, text, seq_len, r["n_tokens"], r["ref_ppl"])
        out.rows.append(
            PlanCheck(
                label=label,
                kind=kind,
                avg_bits=t.avg_bits,
                mb=t.mb,
                predicted=predicted_cost(table, res),
                kl=r["kl"],
                ppl=r["ppl"],
                top1=r["top1"],
                fits=t.total_bits <= totals.total_bits,
                cached=cached,
            )
        )
    return out
