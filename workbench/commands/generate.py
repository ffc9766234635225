"""`workbench generate`: greedy text from a model (optionally quantized with a plan), with tokens/s."""

from __future__ import annotations

from workbench.commands.common import add_model_arg, check_positive, emit_json
from workbench.errors import WorkbenchError


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text greedily and report tokens/s")
    add_model_arg(p, required=False)
    p.add_argument("--plan", default=None, help="plan JSON to apply before generating")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--mode", default="auto", help="decode loop: auto | eager | graph | compile")
    p.add_argument(
        "--path",
        default="auto",
        help="decoder: auto (fast for Llama-family models, else hf) | fast | hf (transformers reference)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def _load(model_arg: str, device, dtype):
    """(model, tokenizer, description string) from a saved quantized folder or any load_model source."""
    from workbench.runtime.serialize import is_quantized_folder, load_quantized, load_tokenizer

    if is_quantized_folder(model_arg):
        model, _ = load_quantized(model_arg, device=device, dtype=dtype)
        tok = load_tokenizer(model_arg)
        if tok is None:
            raise WorkbenchError(f"{model_arg}: no tokenizer saved beside the quantized model")
        return model, tok, f"quantized model {model_arg}"
    from workbench.model.loading import load_model

    loaded = load_model(model_arg, dtype=dtype, device=str(device))
    return loaded.model, loaded.tokenizer, loaded.description.name


def _check_args(args) -> None:
    """The options that need no model, checked before it loads (decode loop, decoder path, token count)."""
    from workbench.runtime.decode import PATHS
    from workbench.runtime.graph import MODES

    if args.mode not in MODES:
        raise WorkbenchError(f"--mode '{args.mode}': unknown decode loop (choose {', '.join(MODES)})")
    if args.path not in PATHS:
        raise WorkbenchError(f"--path '{args.path}': unknown decoder (choose {', '.join(PATHS)})")
    check_positive(args, "max_new_tokens")


def run(args) -> int:
    import torch

    from workbench.plan.plan import Plan
    from workbench.runtime.apply import apply_plan
    from workbench.runtime.decode import make_decoder, select_device
    from workbench.runtime.memory import model_memory

    _check_args(args)
    device, message = select_device(args.device)
    plan = Plan.load(args.plan) if args.plan else None  # a bad plan fails before the model loads
    if message and not args.json:
        print(message)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok, what = _load(args.model, device, dtype)
    resolved = plan.resolve(model) if plan else None
    report = apply_plan(model, resolved) if resolved else None
    ids = tok.prompt_ids(args.prompt)
    L = len(ids) + args.max_new_tokens + 1
    kv = resolved.kv if resolved else None  # K/V cache specs: the fast path stores the cache quantized
    dec = make_decoder(model, max_cache_len=L, mode=args.mode, path=args.path, kv=kv)
    res = dec.generate(ids, args.max_new_tokens, eos_token_id=tok.eos_token_id)
    text = tok.decode(res.tokens)
    mem = model_memory(model)
    cache = dec.cache_bytes() if hasattr(dec, "cache_bytes") else None  # measured: the decoder's buffers
    if args.json:
        emit_json(
            {
                "model": what,
                "device": str(device),
                "text": text,
                "result": res.to_json(),
                "memory": mem.to_json(),
                "kv_cache_bytes": cache,
                "apply": report.to_json() if report else None,
            }
        )
        return 0
    if report:
        print(report.summary())
    print(text)
    print(
        f"-- {len(res.tokens)} tokens; decode {res.decode_tokens_per_s:.1f} tokens/s "
        f"(prefill {res.prefill_s * 1e3:.0f} ms for {res.prompt_tokens} tokens; "
        f"{res.path} path, {res.mode} loop on {device}); "
        f"{mem.total_bytes / 1e6:,.1f} MB of weights"
        + (f", {cache / 1e6:,.2f} MB of K/V cache ({L} slots)" if cache is not None else "")
    )
    unfused = [n for n in res.notes if n.startswith("not fused: ")]
    for note in [n for n in res.notes if n not in unfused]:
        print(f"-- {note}")
    if unfused:
        more = f" (+{len(unfused) - 1} more)" if len(unfused) > 1 else ""
        print(f"-- {len(unfused)} q/k/v or gate/up groups run unfused: {unfused[0][11:]}{more}")
    return 0
