"""`workbench export`: a plan as a deployable artifact (compressed-tensors folder, GGUF file, llama.cpp
tensor-type file)."""

from __future__ import annotations

from workbench.commands.common import add_model_arg, check_out, check_positive, check_text_source, emit_json

FORMATS = ("compressed-tensors", "gguf", "llama-cpp")


def add_parser(sub):
    p = sub.add_parser("export", help="write a plan as compressed-tensors, GGUF or llama.cpp tensor types")
    add_model_arg(p)
    p.add_argument("--plan", required=True, help="plan JSON file (workbench.plan.plan format)")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, help="folder (compressed-tensors) or file (gguf, llama-cpp)")
    p.add_argument("--calib", default="wiki", help="calibration text for gptq layers (default: wiki)")
    p.add_argument("--calib-seqs", type=int, default=32, help="calibration windows for gptq (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def run(args) -> int:
    from workbench.model.inventory import layer_inventory
    from workbench.model.loading import load_model
    from workbench.plan.plan import Plan

    plan = Plan.load(args.plan)  # a bad plan and the options that need no model fail before it loads
    check_out(args.out, "folder" if args.format == "compressed-tensors" else "file")
    if args.format == "compressed-tensors":
        check_positive(args, "calib_seqs")
        check_text_source(args.calib, "--calib")
    loaded = load_model(args.model, progress=not args.json)
    layers = layer_inventory(loaded.model)
    resolved = plan.resolve(layers)
    if args.format == "llama-cpp":
        from workbench.export.llama_cpp import llama_cpp_export

        ex = llama_cpp_export(resolved, layers)
        ex.save(args.out)
        out = {"out": args.out, "rows": ex.rows, "notes": ex.notes, "mismatches": []}
    elif args.format == "gguf":
        from workbench.export.gguf import gguf_export

        out = gguf_export(loaded, resolved, args.out).to_json()
    else:
        from workbench.export.compressed_tensors import compressed_tensors_export
        from workbench.measure.simulate import calibration_grams

        gptq = [n for n, s in resolved.items() if s.is_quantized and s.algo == "gptq"]
        grams = calibration_grams(loaded, gptq, args.calib, args.calib_seqs, progress=False) if gptq else None
        out = compressed_tensors_export(loaded, resolved, args.out, grams).to_json()
    out = {"format": args.format, "model": loaded.description.name, **out}
    if args.json:
        emit_json(out)
        return 0
    for key in ("groups",):
        for spec, names in out.get(key, {}).items():
            print(f"{spec}: {len(names)} layers")
    for row in out.get("rows", []):
        print("  ".join(str(c) for c in row))
    for line in out.get("mismatches", []) + out.get("notes", []):
        print(f"note: {line}")
    print(f"{args.format} written to {args.out}")
    return 0
