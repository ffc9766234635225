"""Helpers shared by the CLI subcommands: common options and output."""

from __future__ import annotations

import json
import sys


def add_model_arg(p, required: bool = True) -> None:
    p.add_argument(
        "--model",
        required=required,
        default="default",
        help="default | model folder | file.gguf | llama2.c .bin | hub id",
    )


def emit_json(obj) -> None:
    """Print one JSON object on stdout (the --json contract)."""
    json.dump(obj, sys.stdout, default=str)
    sys.stdout.write("\n")


def table(rows: list[list], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
