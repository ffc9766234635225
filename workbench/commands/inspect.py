"""`workbench inspect`: describe a model, list its quantizable layers, write them to a folder."""

from __future__ import annotations

import json
from pathlib import Path

from workbench.commands.common import add_model_arg, emit_json, table


def add_parser(sub):
    p = sub.add_parser("inspect", help="describe a model and its layers; write statistics to --out")
    add_model_arg(p)
    p.add_argument("--text", default=None, help="calibration text source (file or name, e.g. wiki, c4)")
    p.add_argument("--tokens", type=int, default=None, help="calibration tokens (n_seqs x seq_len)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def run(args) -> int:
    from workbench.inventory import layer_inventory
    from workbench.loading import load_model

    loaded = load_model(args.model)
    layers = layer_inventory(loaded.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    desc = loaded.description.to_dict()
    (out / "model.json").write_text(json.dumps(desc, indent=2))
    (out / "layers.json").write_text(json.dumps([layer.to_dict() for layer in layers], indent=2))
    if args.json:
        emit_json({"model": desc, "layers": [layer.to_dict() for layer in layers], "out": str(out)})
        return 0
    print(loaded.description.summary())
    rows = [[x.name, "" if x.block is None else x.block, x.role, f"{x.out_features}x{x.in_features}",
             x.n_params, "tied" if x.tied else ""] for x in layers]
    print(table(rows, ["layer", "block", "role", "shape (out x in)", "params", ""]))
    print(f"{len(layers)} quantizable layers; written to {out}")
    return 0
