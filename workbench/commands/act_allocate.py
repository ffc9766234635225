"""`workbench act-allocate`: per-layer weight + activation candidates scanned on each transform set, allocated
under a weight-bit budget, the transform set chosen by predicted KL
(workbench.measure.sensitivity_transformed)."""

from __future__ import annotations

from workbench.commands.common import add_model_arg, check_out, check_positive, check_text_source, emit_json

TRANSFORM_SETS = {"none": [], "hadamard": "hadamard residual + down"}


def add_parser(sub):
    p = sub.add_parser(
        "act-allocate",
        help="choose weight@act candidates per layer (e.g. W4A8 / W8A8) and the global transform set",
    )
    add_model_arg(p)
    p.add_argument(
        "--candidates",
        default="int4_g128@int8_tok_sym,int8_ch_sym@int8_tok_sym",
        help="comma list of weight@act candidates (default: W4A8 and W8A8)",
    )
    p.add_argument("--transforms", default="none,hadamard", help="comma list of sets: none, hadamard")
    p.add_argument("--budget", type=float, required=True, help="average weight bits of the scanned layers")
    p.add_argument("--text", default="wiki", help="scan text (default: wiki)")
    p.add_argument("--seqs", type=int, default=1, help="scan windows (default 1)")
    p.add_argument("--seq-len", type=int, default=256, help="window length (default 256)")
    p.add_argument("--out", required=True, help="write the chosen plan (JSON, version 2) here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    return p


def run(args) -> int:
    from workbench.errors import WorkbenchError
    from workbench.measure.sensitivity_transformed import (
        allocate_candidates,
        parse_candidate,
        scan_transformed,
    )
    from workbench.model.loading import load_model
    from workbench.plan.plan import Rule
    from workbench.transform.compare import PRESETS

    sets = [s.strip() for s in args.transforms.split(",") if s.strip()]
    bad = [s for s in sets if s not in TRANSFORM_SETS]
    if bad or not sets:
        raise WorkbenchError(f"--transforms: unknown set(s) {bad} (choose {', '.join(TRANSFORM_SETS)})")
    cands = [c.strip() for c in args.candidates.split(",") if c.strip()]
    if not cands:
        raise WorkbenchError(f"--candidates '{args.candidates}': no candidates given")
    for c in cands:  # the options that need no model fail before it loads
        try:
            parse_candidate(c)
        except WorkbenchError as exc:
            raise WorkbenchError(f"--candidates: {exc}") from None
    check_positive(args, "budget", "seqs", "seq_len")
    check_text_source(args.text, "--text")
    check_out(args.out, "file")
    loaded = load_model(args.model, progress=False)
    head = [Rule("lm_head", "bf16", "none")]
    allocs = {}
    for name in sets:
        ts = PRESETS[TRANSFORM_SETS[name]] if TRANSFORM_SETS[name] else []
        scan = scan_transformed(loaded, cands, ts, text=args.text, n_seqs=args.seqs, seq_len=args.seq_len)
        allocs[name] = allocate_candidates(scan, args.budget, extra_rules=head)
    chosen = min(allocs, key=lambda k: allocs[k].predicted_kl)
    allocs[chosen].plan.save(args.out)
    summary = {
        k: {
            "predicted_kl": a.predicted_kl,
            "avg_bits": a.avg_bits,
            "counts": {c: list(a.choice.values()).count(c) for c in sorted(set(a.choice.values()))},
        }
        for k, a in allocs.items()
    }
    if args.json:
        emit_json({"chosen": chosen, "plan": args.out, "sets": summary})
        return 0
    for k, s in summary.items():
        print(f"{k}: predicted KL {s['predicted_kl']:.4f}, {s['avg_bits']:.3f} bits/weight, {s['counts']}")
    print(f"chosen: {chosen}; plan written to {args.out}")
    return 0
