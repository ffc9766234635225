"""Helpers shared by the CLI subcommands: common options, checks of the arguments that need no model, and
output.

The checks run before a command loads its model (seconds for the default model), so a mistyped path, spec or
number fails at once with a one-line WorkbenchError that names the option and the value at fault.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from workbench.errors import WorkbenchError
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


# ---------------------------------------------------------------------- checks before the model loads
def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_positive(args, *dests: str) -> None:
    """Refuse each option among `dests` (argparse names) that was given and is not > 0, all at once."""
    bad = [
        f"{_option(d)} {getattr(args, d)}"
        for d in dests
        if getattr(args, d) is not None and getattr(args, d) <= 0
    ]
    if bad:
        raise WorkbenchError(f"{', '.join(bad)}: must be greater than 0")


def parse_spec_list(text: str, option: str = "--specs", empty_ok: bool = False) -> list[str]:
    """The comma-separated quantization specs of `option`, each parsed; every bad one named in one error."""
    from workbench.quant.spec import QuantSpec

    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs and not empty_ok:
        raise WorkbenchError(f"{option} '{text}': no specs given")
    problems = []
    for s in specs:
        try:
            QuantSpec.parse(s)
        except WorkbenchError as exc:
            problems.append(str(exc))
    if problems:
        raise WorkbenchError(f"{option}: {'; '.join(problems)}")
    return specs


def check_text_source(source: str | None, option: str) -> None:
    """Refuse a text source that is neither a file, a named source nor `hf:<dataset>` (no network used)."""
    from workbench.model.data import resolve_text_source

    if source is None:
        return
    try:
        resolve_text_source(source)
    except WorkbenchError as exc:
        raise WorkbenchError(f"{option}: {exc}") from None


def check_device(device: str | None, option: str = "--device", auto: bool = True) -> None:
    """Refuse an unknown device name, or cuda on a machine without CUDA (`select_device`'s rules); "auto"
    only where the command picks the device itself (`auto`)."""
    from workbench.runtime.decode import select_device

    if device is None:
        return
    if device == "auto" and not auto:
        raise WorkbenchError(f"{option} auto: name the device here (cpu or cuda)")
    try:
        select_device(device)
    except WorkbenchError as exc:
        msg = str(exc)
        raise WorkbenchError(msg if msg.startswith(option) else f"{option}: {msg}") from None


def check_out(path: str, kind: str, option: str = "--out") -> None:
    """Refuse an output path that cannot be written as a `kind` ("file" or "folder"): an existing path of
    the other kind, or a file where one of its parent folders would have to be."""
    assert kind in ("file", "folder"), f"check_out kind {kind!r}"
    p = Path(path).expanduser()
    if p.exists():
        if kind == "file" and p.is_dir():
            raise WorkbenchError(f"{option} {path} is a folder; give a file name")
        if kind == "folder" and not p.is_dir():
            raise WorkbenchError(f"{option} {path} is a file; give a folder")
        return
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise WorkbenchError(f"{option} {path}: {parent} is a file, so no folder can be made there")
