"""`workbench quantize`: apply a plan to a model and save the packed result (save_quantized folder)."""

from __future__ import annotations

from workbench.commands.common import add_model_arg, check_out, check_positive, check_text_source, emit_json


def add_parser(sub):
    p = sub.add_parser("quantize", help="quantize a model with a plan and save packed weights to --out")
    add_model_arg(p)
    p.add_argument("--plan", required=True, help="plan JSON file (workbench.plan.plan format)")
    p.add_argument("--out", required=True, help="output folder (model.safetensors + plan.json + manifest)")
    p.add_argument(
        "--device", default="auto", help="auto | cpu | cuda: where to quantize (RTN runs on the GPU)"
    )
    p.add_argument("--text", default="wiki", help="calibration text for GPTQ / AWQ layers")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens for GPTQ / AWQ layers")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--stream",
        action="store_true",
        help="--model is a safetensors checkpoint folder (or synthetic): quantize one block at a time and "
        "write the packed model shard by shard",
    )
    return p


def run(args) -> int:
    import torch

    from workbench.measure.simulate import calibration_grams
    from workbench.model.loading import load_model
    from workbench.plan.plan import Plan
    from workbench.runtime.apply import apply_plan
    from workbench.runtime.decode import select_device
    from workbench.runtime.serialize import save_quantized

    device, message = select_device(args.device)
    if message and not args.json:
        print(message)
    plan = Plan.load(args.plan)  # the plan and the options that need no model fail before it loads
    check_positive(args, "tokens", "seq_len")
    check_text_source(args.text, "--text")
    check_out(args.out, "folder")
    if args.stream:
        return _run_stream(args, plan, device)
    loaded = load_model(args.model, dtype=torch.float32)
    resolved = plan.resolve(loaded.model)
    seq_len = min(args.seq_len, loaded.description.max_context or args.seq_len)
    grams = calibration_grams(
        loaded, resolved.gram_layers, args.text, max(1, args.tokens // seq_len), seq_len, use_cache=False
    )
    if device.type == "cuda":
        loaded.model.to(device=device, dtype=torch.bfloat16)
    report = apply_plan(loaded.model, resolved, grams)
    loaded.model.to("cpu")
    folder = save_quantized(
        loaded.model, plan, args.out, tokenizer=loaded.tokenizer, source=loaded.description.source
    )
    if args.json:
        emit_json({"out": str(folder), "report": report.to_json(), "device": str(device)})
        return 0
    print(report.summary())
    print(f"saved to {folder}")
    return 0


def _run_stream(args, plan, device) -> int:
    from workbench.streaming.open import open_streamed, stream_batches
    from workbench.streaming.quantize import stream_quantize

    sm, tok = open_streamed(args.model, device)
    ids, _ = stream_batches(sm, tok, args.text, max(1, args.tokens // args.seq_len), args.seq_len)
    folder, report = stream_quantize(sm, plan, args.out, ids, tokenizer=tok, progress=not args.json)
    if args.json:
        emit_json({"out": str(folder), "report": report.to_json(), "device": str(device)})
        return 0
    print(f"{report.n_layers} layers quantized block by block in {report.seconds:.1f} s; saved to {folder}")
    return 0
