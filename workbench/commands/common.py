"""Helpers shared by the CLI subcommands: common options and output."""

from __future__ import annotations

import json
import sys

from workbench.tables import table as table  # the commands print core tables


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
