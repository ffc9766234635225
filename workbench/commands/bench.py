"""`workbench bench kernels|e2e`: run the benchmarks of benchmarks/ (source checkout, CUDA device)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from workbench.errors import WorkbenchError

SCRIPTS = {"kernels": "bench_kernels.py", "e2e": "bench_e2e.py"}


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmark the kernels or end-to-end decode (needs CUDA)")
    p.add_argument(
        "what", choices=sorted(SCRIPTS), help="kernels: dequant-matmul vs cuBLAS; e2e: decode tok/s"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--quick", action="store_true", help="kernels: two shapes; e2e: a 4-block model")
    return p


def load_benchmark(what: str):
    """Import benchmarks/<script> from the source checkout."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / SCRIPTS[what]
    if not path.is_file():
        raise WorkbenchError(f"{path} not found: `workbench bench` runs from a source checkout")
    spec = importlib.util.spec_from_file_location(f"workbench_bench_{what}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        raise WorkbenchError("benchmarks need a CUDA device (none found)")
    module = load_benchmark(args.what)
    module.run(json=args.json, quick=args.quick)  # prints a table, or one JSON object with --json
    return 0
