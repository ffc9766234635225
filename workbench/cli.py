"""The `workbench` command line: one subcommand per arrow of the data flow (see docs/DESIGN.md).

Each subcommand lives in `workbench/commands/<name>.py` with `add_parser(subparsers)` and `run(args) -> int`;
those modules import nothing heavy at import time, so `workbench --help` is instant. A user mistake
(`WorkbenchError`) prints one line on stderr and exits with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from workbench.errors import WorkbenchError

COMMANDS = (
    "serve",
    "inspect",
    "outliers",
    "sensitivity",
    "allocate",
    "act_allocate",
    "eval",
    "quantize",
    "export",
    "generate",
    "bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench",
        description="Quant Workbench: inspect a language model, plan mixed-precision quantization, run it.",
    )
    parser.add_argument("--version", action="version", version="%(prog)s 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"workbench.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"workbench.commands.{name}":
                raise
            continue
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except WorkbenchError as exc:
        print(f"workbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"workbench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
