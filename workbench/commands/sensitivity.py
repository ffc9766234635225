"""`workbench sensitivity`: the layer x spec sensitivity table (Fisher-weighted, proxy or measured KL)."""

from __future__ import annotations

from pathlib import Path

from workbench.commands.common import (
    add_model_arg,
    check_device,
    check_out,
    check_positive,
    check_text_source,
    emit_json,
    parse_spec_list,
    table,
)
from workbench.errors import WorkbenchError


def add_parser(sub):
    from workbench.defaults import DEFAULT_METHOD, SENSITIVITY_SPECS

    p = sub.add_parser("sensitivity", help="cost of quantizing each layer alone, for each candidate spec")
    add_model_arg(p)
    p.add_argument(
        "--specs",
        default=",".join(SENSITIVITY_SPECS),
        help="comma-separated candidate specs (default: the app's offered specs)",
    )
    p.add_argument(
        "--method",
        choices=("fisher", "proxy", "kl"),
        default=DEFAULT_METHOD,
        help="fisher (default): Fisher-weighted output error, nats of KL that add up over layers to "
        "predict a plan; proxy: relative output error of the layer alone (does not rank whole plans); "
        "kl: measured ΔKL of the whole model per layer (slow)",
    )
    p.add_argument("--text", default=None, help="calibration / scan text source (default: the app's)")
    p.add_argument(
        "--scan-seqs", type=int, default=None, help="kl / fisher: windows of the scan batch (default 2 / 8)"
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="kl / fisher: scan window length (default: the app's)"
    )
    p.add_argument("--calib-seqs", type=int, default=None, help="Gram calibration windows (default: app's)")
    p.add_argument(
        "--calib-seq-len", type=int, default=None, help="Gram calibration window length (default: app's)"
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
    p.add_argument(
        "--stream",
        action="store_true",
        help="proxy only: --model is a safetensors checkpoint folder (or synthetic) read one block at a "
        "time; under torchrun the blocks are sharded over the ranks and rank 0 merges --out",
    )
    p.add_argument("--device", default="cpu", help="--stream: where the blocks run (cpu | cuda)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _settings(args, description) -> dict:
    """The app's scan settings (`workbench.defaults.scan_settings`), overridden by the options given."""
    from workbench.defaults import scan_settings

    cfg = scan_settings(description)
    if args.method == "kl":
        cfg["n_seqs"] = 2  # one re-run of the model tail per layer x spec: keep the kl batch small
    given = {
        "text": args.text,
        "n_seqs": args.scan_seqs,
        "seq_len": args.seq_len,
        "calib_seqs": args.calib_seqs,
        "calib_seq_len": args.calib_seq_len,
    }
    cfg.update({k: v for k, v in given.items() if v is not None})
    return cfg


def _check_args(args) -> list[str]:
    """The options that need no model, checked before it loads; returns the specs."""
    from workbench.measure.sensitivity import SensitivityTable

    specs = parse_spec_list(args.specs)
    if args.importance_spec is not None:
        parse_spec_list(args.importance_spec, "--importance-spec")
    check_positive(args, "scan_seqs", "seq_len", "calib_seqs", "calib_seq_len")
    check_text_source(args.text, "--text")
    check_out(args.out, "file")
    if Path(args.out).is_file():
        SensitivityTable.load(args.out)  # a table to resume must be readable (its identity needs the model)
    if args.stream:
        if args.method != "proxy" or args.importance != "none":
            raise WorkbenchError("--stream scans with --method proxy (no importance); got " + args.method)
        check_device(args.device, auto=False)
    return specs


def run(args) -> int:
    from workbench.measure.sensitivity import sensitivity_scan
    from workbench.model.loading import load_model

    specs = _check_args(args)
    if args.stream:
        return _run_stream(args, specs)
    loaded = load_model(args.model, progress=not args.quiet)
    tab = sensitivity_scan(
        loaded,
        specs,
        args.method,
        out=args.out,
        **_settings(args, loaded.description),
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


def _run_stream(args, specs: list[str]) -> int:
    from workbench.streaming.distributed import distributed_scan, init_distributed, rank_device
    from workbench.streaming.open import open_streamed, stream_batches

    rank, _ = init_distributed()
    sm, tok = open_streamed(args.model, rank_device(args.device))
    ids, settings = stream_batches(
        sm, tok, args.text or "wiki", args.calib_seqs or 32, args.calib_seq_len or 512, seed=0
    )
    tab, report = distributed_scan(sm, ids, specs, args.out, settings=settings, progress=not args.quiet)
    if rank != 0:
        return 0
    if args.json:
        emit_json({"out": args.out, "report": report.to_json(), **tab.to_json()})
        return 0
    rows = [[r[0]] + [f"{v:.3g}" for v in r[1:]] for r in tab.rows()]
    print(table(rows, ["layer"] + tab.specs))
    print(f"proxy sensitivity of {len(tab.layers)} layers streamed in {report.seconds:.1f} s: {args.out}")
    return 0
