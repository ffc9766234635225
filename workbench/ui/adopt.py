"""How the state takes a finished job's result: set its public fields, refresh the plan's prices, notify.

Each function runs on the UI thread (`WorkbenchState.run_ui`) with the value a `workbench/ui/tasks.py`
function returned; together with tasks.py this is the whole of a job, and neither reads private fields.
"""

from __future__ import annotations

WHAT = {"fisher": "Fisher-weighted output error, nats of KL", "proxy": "relative output error"}


def inspection(state, result, text: str, n_seqs: int, seq_len: int) -> None:
    """New activation statistics: the layer table's activation-outlier column follows."""
    state.inspection = result
    state.details = None
    state.refresh()
    source = "from cache" if result.from_cache else "computed"
    tokens = f"{n_seqs} x {seq_len} tokens of '{text}'"
    state.notify(f"activation statistics ready ({source}, {tokens})", "success")


def sensitivity(state, table) -> None:
    """A new sensitivity table: the plan is priced with it, an older verification no longer applies."""
    state.sensitivity = table
    state.verification = None
    state.refresh()
    state.notify(
        f"sensitivity table ready: {len(table.layers)} layers x {len(table.specs)} specs "
        f"({table.method}: {WHAT.get(table.method, 'measured KL')})",
        "success",
    )


def verification(state, v, label: str) -> None:
    state.verification = v
    kind = "warning" if v.beaten_by() else "success"
    state.notify(f"verified {label}: measured KL {v.plan.kl:.4g} - {v.verdict()}", kind)


def evaluation(state, result, label: str, plan_json: str, totals, reference: bool) -> None:
    """Append one row to the results table (`totals`: the PlanTotals of the plan when it was evaluated)."""
    row = {
        "plan": label,
        "MB": round(totals.bf16_mb if reference else totals.mb, 4),
        "avg bits": 16.0 if reference else round(totals.avg_bits, 3),
        "ppl": round(result.ppl, 4),
        "ref ppl": round(result.ref_ppl, 4),
        "KL (nats)": float(f"{result.kl:.4g}"),  # 4 significant digits
        "top-1": round(result.top1, 4),
        "tokens": result.n_tokens,
        "text": result.text,
        "seconds": round(result.seconds, 1),
        "plan_json": plan_json,
    }
    state.evaluations = state.evaluations + [row]
    state.notify(
        f"evaluated {label}: ppl {result.ppl:.3f} (reference {result.ref_ppl:.3f}), "
        f"KL {result.kl:.4g} nats, top-1 {100 * result.top1:.2f}%",
        "success",
    )


def load_failed(state, source: str, restore: str, message: str) -> None:
    """The model box goes back to the model still loaded (or the default), not the bad path."""
    state.source = restore
    state.phase = "ready" if state.loaded is not None else "error"
    state.notify(f"could not load '{source}': {message}", "error")
