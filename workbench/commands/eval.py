"""`workbench eval`: perplexity, KL(P_ref || P_q) and top-1 agreement of a plan (simulated) vs the model."""

from __future__ import annotations

from workbench.commands.common import add_model_arg, check_positive, check_text_source, emit_json, table


def add_parser(sub):
    p = sub.add_parser("eval", help="perplexity, KL and top-1 vs the unquantized model (plan simulated)")
    add_model_arg(p)
    p.add_argument("--plan", help="plan JSON (default: evaluate the unquantized model)")
    p.add_argument("--text", default="wikitext2", help="evaluation text source (default: wikitext2 test)")
    p.add_argument("--tokens", type=int, default=32768, help="token limit (default 32768)")
    p.add_argument("--seq-len", type=int, help="window length (default: min(512, the model's context))")
    p.add_argument("--calib", default="wiki", help="calibration text for gptq/awq layers (default: wiki)")
    p.add_argument("--calib-seqs", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-seq-len", type=int, help="calibration window length (default: like --seq-len)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def run(args) -> int:
    from workbench.measure.evaluate import evaluate
    from workbench.measure.simulate import calibration_grams
    from workbench.model.loading import load_model
    from workbench.plan.plan import Plan, plan_totals
    from workbench.plan.transforms import transform_to_json
    from workbench.transform.apply import apply_transforms

    plan = Plan.load(args.plan) if args.plan else None  # a bad plan fails before the model loads
    check_positive(args, "tokens", "seq_len", "calib_seqs", "calib_seq_len")
    check_text_source(args.text, "--text")
    if plan is not None:
        check_text_source(args.calib, "--calib")
    loaded = load_model(args.model, progress=not args.quiet)
    resolved, totals, grams, transformed = None, None, None, None
    if plan is not None:
        resolved = plan.resolve(loaded.model)
        totals = plan_totals(resolved, resolved.layers)
        if resolved.transforms:  # calibrate GPTQ / AWQ on the transformed model's inputs
            transformed = apply_transforms(loaded, resolved.transforms, progress=not args.quiet)
        grams = calibration_grams(
            transformed or loaded,
            resolved.gram_layers,
            args.calib,
            args.calib_seqs,
            args.calib_seq_len,
            progress=not args.quiet,
        )
    res = evaluate(
        loaded,
        resolved,
        text=args.text,
        seq_len=args.seq_len,
        max_tokens=args.tokens,
        grams=grams,
        progress=not args.quiet,
        transformed=transformed,
    )
    if args.json:
        emit_json(
            {
                "model": loaded.description.name,
                "plan": args.plan,
                **res.to_json(),
                "totals": totals.to_json() if totals else None,
                "acts": {n: str(a) for n, a in resolved.acts.items()} if resolved else {},
                "transforms": [transform_to_json(t) for t in resolved.transforms] if resolved else [],
                "kv": {n: s.to_json() for n, s in resolved.kv.items()} if resolved else {},
            }
        )
        return 0
    rows = [
        ["perplexity", f"{res.ppl:.4f}", f"{res.ref_ppl:.4f}"],
        ["KL (nats/token)", f"{res.kl:.5f}", "0"],
        ["top-1 agreement", f"{100 * res.top1:.2f}%", "100%"],
    ]
    print(table(rows, ["metric", args.plan or "reference", "reference"]))
    if totals:
        print(f"plan: {totals.summary()}")
    if resolved is not None and (resolved.acts or resolved.transforms):
        acts = sorted({str(a) for a in resolved.acts.values()})
        kinds = [f"{t.kind}:{getattr(t, 'where', getattr(t, 'match', ''))}" for t in resolved.transforms]
        print(
            f"activations quantized (simulated) on {len(resolved.acts)} layers ({', '.join(acts) or '-'}); "
            f"transforms: {', '.join(kinds) or '-'}"
        )
    if resolved is not None and resolved.kv:
        kinds = sorted({f"K {s.to_json()['k']} / V {s.to_json()['v']}" for s in resolved.kv.values()})
        print(f"KV cache quantized (simulated) in {len(resolved.kv)} attention blocks: {'; '.join(kinds)}")
    print(
        f"{res.n_tokens} predicted tokens of {args.text} in {res.n_windows} windows of {res.seq_len}; "
        f"{res.seconds:.1f} s"
    )
    return 0
