"""`workbench outliers`: kurtosis and max/median of layer inputs before and after a plan's transforms."""

from __future__ import annotations

from workbench.commands.common import add_model_arg, check_positive, check_text_source, emit_json, table


def add_parser(sub):
    p = sub.add_parser(
        "outliers", help="kurtosis and max/median of layer inputs, before and after a plan's transforms"
    )
    add_model_arg(p)
    p.add_argument("--plan", required=True, help="plan JSON (version 2) whose 'transforms' are compared")
    p.add_argument("--match", default="role:down", help="layers: name, re:<regex> or role:<role> (role:down)")
    p.add_argument("--text", default="wiki", help="calibration text (default: wiki)")
    p.add_argument("--seqs", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seq-len", type=int, default=512, help="window length (default 512)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def run(args) -> int:
    from workbench.errors import WorkbenchError
    from workbench.model.data import calibration_batches
    from workbench.model.inventory import layer_inventory
    from workbench.model.loading import load_model
    from workbench.plan.plan import Plan, match_layers
    from workbench.stats.outliers import input_outliers
    from workbench.transform.apply import apply_transforms

    plan = Plan.load(args.plan)
    if not plan.transforms:
        raise WorkbenchError(f"plan file {args.plan} has no 'transforms' to compare (plan version 2)")
    check_positive(args, "seqs", "seq_len")
    check_text_source(args.text, "--text")
    loaded = load_model(args.model, progress=False)
    names = match_layers(args.match, layer_inventory(loaded.model))
    if not names:
        raise WorkbenchError(f"--match '{args.match}' selects no layer of {loaded.description.name}")
    d = loaded.description
    batches = calibration_batches(loaded.tokenizer, args.text, args.seqs, args.seq_len, 0, d.max_context)
    before = input_outliers(loaded.model, names, batches)
    after = input_outliers(apply_transforms(loaded, plan.transforms).model, names, batches)
    if args.json:
        emit_json({n: {"before": before[n].to_json(), "after": after[n].to_json()} for n in names})
        return 0
    rows = [
        [n, f"{before[n].kurtosis:.2f}", f"{after[n].kurtosis:.2f}", f"{before[n].max_median:.1f}",
         f"{after[n].max_median:.1f}"]
        for n in names
    ]  # fmt: skip
    print(table(rows, ["layer input", "kurtosis", "after", "max/median", "after"]))
    print(f"{args.seqs} x {args.seq_len} tokens of {args.text}; Gaussian kurtosis = 3")
    return 0
