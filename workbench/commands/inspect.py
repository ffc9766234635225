"""`workbench inspect`: describe a model, compute its weight and activation statistics, write them to --out.

Statistics (workbench/stats/) are cached: the second run with the same model, text and settings loads them
from disk. The summary names the ten input groups with the strongest channel outliers and their worst
channels, the massive activations (which tokens carry them) and the most heavy-tailed weights.
"""

from __future__ import annotations

import json
import sys
import time
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
    p = sub.add_parser("inspect", help="describe a model and its layers; write statistics to --out")
    add_model_arg(p)
    p.add_argument("--text", default="wiki", help="calibration text source (file or name, e.g. wiki, c4)")
    p.add_argument(
        "--tokens",
        type=int,
        default=64 * 512,
        help="calibration tokens: n_seqs = tokens // seq-len (default 32768)",
    )
    p.add_argument(
        "--seq-len", type=int, help="tokens per calibration sequence (default: min(512, the model's context))"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument(
        "--mode",
        choices=("full", "layerwise"),
        default="full",
        help="full forward per batch, or one decoder block at a time (same statistics)",
    )
    p.add_argument("--device", default=None, help="layerwise: device the blocks run on (e.g. cuda)")
    p.add_argument(
        "--specs",
        default="int4_g128,int8_ch",
        help="comma-separated specs whose grid levels are stored per layer",
    )
    p.add_argument("--k-sigma", type=float, default=6.0, help="report weights beyond k standard deviations")
    p.add_argument("--no-gram", action="store_true", help="skip the Gram matrices X^T X")
    p.add_argument("--no-cache", action="store_true", help="recompute even when cached statistics exist")
    p.add_argument("--no-stats", action="store_true", help="only describe the model and list its layers")
    p.add_argument("--top", type=int, default=10, help="layers in the outlier summary (default 10)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    p.add_argument(
        "--stream",
        action="store_true",
        help="--model is a safetensors checkpoint folder (or synthetic): one decoder block resident at a "
        "time, read from disk; under torchrun the layers are sharded over the ranks",
    )
    return p


def run(args) -> int:
    from workbench.model.data import default_seq_len
    from workbench.model.inventory import layer_inventory
    from workbench.model.loading import load_model

    specs = _check_args(args)
    if args.stream:
        return _run_stream(args, specs)
    t0 = time.perf_counter()
    loaded = load_model(args.model, progress=not args.quiet)
    seq_len = args.seq_len or default_seq_len(loaded.description.max_context)
    if args.tokens < seq_len:
        raise WorkbenchError(f"--tokens {args.tokens} is less than one sequence of {seq_len} tokens")
    layers = layer_inventory(loaded.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    desc = loaded.description.to_dict()
    (out / "model.json").write_text(json.dumps(desc, indent=2))
    (out / "layers.json").write_text(json.dumps([layer.to_dict() for layer in layers], indent=2))
    if args.no_stats:
        return _describe_only(args, loaded, layers, out, desc)

    from workbench.stats.inspection import inspect_model

    n_seqs = args.tokens // seq_len
    insp = inspect_model(
        loaded,
        args.text,
        n_seqs,
        seq_len,
        args.seed,
        mode=args.mode,
        gram=not args.no_gram,
        specs=specs,
        k_sigma=args.k_sigma,
        cache=not args.no_cache,
        progress=not args.quiet,
        device=args.device,
    )
    insp.save(out)
    kv = _kv_stats(loaded, args, n_seqs, seq_len, out)
    seconds = time.perf_counter() - t0
    if args.json:
        emit_json(
            {
                "model": desc,
                "out": str(out),
                "from_cache": insp.from_cache,
                "seconds": round(seconds, 2),
                "settings": insp.settings,
                "outliers": insp.outliers(args.top),
                "massive": insp.massive(),
                "heavy_tails": insp.heavy_tails(),
                "kv_outliers": {side: kv.outliers(side) for side in ("k_pre", "k_post", "v")} if kv else None,
            }
        )
        return 0
    print(loaded.description.summary())
    print()
    print(insp.summary(args.top))
    if kv is not None:
        print(kv.summary())
    print(
        f"\nstatistics of {len(layers)} layers written to {out} "
        f"({'from cache' if insp.from_cache else 'computed'} in {seconds:.1f} s)"
    )
    return 0


def _check_args(args) -> list[str]:
    """The options that need no model, checked before it loads; returns the specs."""
    check_positive(args, "tokens", "seq_len", "k_sigma", "top")
    if args.seq_len is not None and args.tokens < args.seq_len:
        raise WorkbenchError(f"--tokens {args.tokens} is less than one sequence of --seq-len {args.seq_len}")
    check_out(args.out, "folder")
    check_device(args.device, auto=False)
    if args.no_stats:
        return []
    check_text_source(args.text, "--text")
    return parse_spec_list(args.specs, empty_ok=True)  # none: no grid levels stored


def _kv_stats(loaded, args, n_seqs: int, seq_len: int, out: Path):
    """K / V statistics (workbench.stats.kv) written beside the inspection; None for non-Llama attention."""
    from workbench.stats.kv import kv_statistics

    try:
        kv = kv_statistics(loaded, args.text, n_seqs, seq_len, args.seed)
    except WorkbenchError as exc:
        print(f"no KV-cache statistics: {exc}", file=sys.stderr)
        return None
    kv.save(out)
    return kv


def _describe_only(args, loaded, layers, out, desc) -> int:
    if args.json:
        emit_json({"model": desc, "layers": [layer.to_dict() for layer in layers], "out": str(out)})
        return 0
    print(loaded.description.summary())
    rows = [
        [
            x.name,
            "" if x.block is None else x.block,
            x.role,
            f"{x.out_features}x{x.in_features}",
            x.n_params,
            "tied" if x.tied else "",
        ]
        for x in layers
    ]
    print(table(rows, ["layer", "block", "role", "shape (out x in)", "params", ""]))
    print(f"{len(layers)} quantizable layers; written to {out}")
    return 0


def _run_stream(args, specs: list[str]) -> int:
    from workbench.streaming.distributed import distributed_inspect, init_distributed, rank_device
    from workbench.streaming.open import open_streamed, stream_batches

    rank, _ = init_distributed()
    sm, tok = open_streamed(args.model, rank_device(args.device or "cpu"))
    seq_len = args.seq_len or 512
    ids, settings = stream_batches(sm, tok, args.text, max(1, args.tokens // seq_len), seq_len, args.seed)
    insp, report = distributed_inspect(
        sm,
        ids,
        args.out,
        settings=settings,
        specs=specs,
        k_sigma=args.k_sigma,
        gram=False,  # a streamed model's Grams are not kept (70B: ~650 GB); the scan computes its own
        gram_pass=False,
        progress=not args.quiet,
        tokenizer=tok,
    )
    if rank != 0:
        return 0
    if args.json:
        emit_json({"out": args.out, "settings": insp.settings, "report": report and report.to_json()})
        return 0
    print(insp.summary(args.top))
    if report is not None:
        print(f"\nstreamed {report.n_blocks} blocks in {report.seconds:.1f} s; written to {args.out}")
    return 0
