"""`workbench sensitivity`: the layer x spec sensitivity table (proxy or measured KL), resumable."""

from __future__ import annotations

from workbench.commands.common import add_model_arg, emit_json, table


def add_parser(sub):
    p = sub.add_parser("sensitivity", help="cost of quantizing each layer alone, for each candidate spec")
    add_model_arg(p)
    p.add_argument("--specs", required=True, help="comma-separated candidate specs, e.g. int3_g128,int4_g128")
    p.add_argument(
        "--method",
        choices=("proxy", "kl"),
        default="proxy",
        help="proxy: Gram-based output error (fast); kl: measured ΔKL of the whole model",
    )
    p.add_argument("--text", default="wiki", help="calibration / scan text source (default: wiki)")
    p.add_argument("--scan-seqs", type=int, default=2, help="kl: windows of the scan batch (default 2)")
    p.add_argument(
        "--seq-len", type=int, help="kl: window length of the scan batch (default: min(256, context))"
    )
    p.add_argument("--calib-seqs", type=int, default=32, help="Gram calibration windows (default 32)")
    p.add_argument(
        "--calib-seq-len", type=int, help="Gram calibration window length (default: min(512, context))"
    )
    p.add_argument(
        "--importance",
        choices=("none", "kl"),
        default="none",
        help="proxy: weight each layer by one measured ΔKL at --importance-spec",
    )
    p.add_argument(
        "--importance-spec", default=None, help="spec of the importance measurement (default: first)"
    )
    p.add_argument(
        "--out", required=True, help="table JSON; an unfinished table with the same settings resumes"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def run(args) -> int:
    from workbench.loading import load_model
    from workbench.sensitivity import sensitivity_scan

    loaded = load_model(args.model, progress=not args.quiet)
    specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    tab = sensitivity_scan(
        loaded,
        specs,
        args.method,
        out=args.out,
        text=args.text,
        n_seqs=args.scan_seqs,
        seq_len=args.seq_len,
        calib_seqs=args.calib_seqs,
        calib_seq_len=args.calib_seq_len,
        importance=args.importance,
        importance_spec=args.importance_spec,
        progress=not args.quiet,
    )
    if args.json:
        emit_json({"out": args.out, **tab.to_json()})
        return 0
    rows = [[r[0]] + [f"{v:.3g}" for v in r[1:]] for r in tab.rows()]
    print(table(rows, ["layer"] + tab.specs))
    print(
        f"{tab.method} sensitivity of {len(tab.layers)} layers x {len(tab.specs)} specs "
        f"written to {args.out} "
        f"(setup {tab.timing.get('setup', 0):.1f} s, scan {tab.timing.get('scan', 0):.1f} s)"
    )
    return 0
