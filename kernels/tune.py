"""Launch shapes chosen per GPU by timing, cached on disk as JSON (no device constants in code).

The first call of a tuned kernel for a (GPU name, kernel, shape) key times each candidate launch shape
on the real inputs (L2 flushed before every timed launch, median of a few) and keeps the fastest; the
choice is written to ``$WORKBENCH_TUNE_CACHE`` (default ``~/.cache/workbench/kernel_tune.json``), one
object ``{"<gpu name>": {"<key>": [params...]}}``, and read back by later processes.  While a CUDA graph
is being captured nothing can be timed: the caller's heuristic shape is used and nothing is cached.

Opt-in: timing passes run only with ``WORKBENCH_TUNE=1`` (a cached choice is used either way).  The
timing here is one launch between events after an L2 flush; on the H200 (2026-12-02,
``benchmarks/RESULTS.md``) that ranked 10-25 us kernels wrongly against the CUDA-graph timings of
``bench_kernels.py`` (launch overhead and split-K's extra memset / cast launches dominate the
differences), so it stays off by default until it times CUDA graphs over rotated weight copies.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

_MEM: dict[str, dict[str, list]] = {}
_FLUSH: dict[str, torch.Tensor] = {}


def cache_path() -> Path:
    """The JSON file holding the tuned launch shapes."""
    env = os.environ.get("WORKBENCH_TUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "workbench" / "kernel_tune.json"


def _load(gpu: str) -> dict[str, list]:
    if gpu not in _MEM:
        try:
            data = json.loads(cache_path().read_text())
            _MEM[gpu] = {k: list(v) for k, v in data.get(gpu, {}).items()}
        except (OSError, ValueError, AttributeError):
            _MEM[gpu] = {}
    return _MEM[gpu]


def _save(gpu: str) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data.setdefault(gpu, {}).update(_MEM[gpu])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: keep the choice in memory only


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """One launch in ms with L2 flushed first (a 256 MB write)."""
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(64 * 2**20, dtype=torch.int32, device=device)
    _FLUSH[key].zero_()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1)


def pick(
    kernel: str,
    key: str,
    device: torch.device,
    candidates: Sequence[tuple],
    run: Callable[[tuple], object],
    default: tuple,
    reps: int = 5,
) -> tuple:
    """The fastest of ``candidates`` for ``kernel``/``key`` on this GPU (cached), or ``default``.

    ``run(params)`` launches the kernel once with a candidate's parameters (it may write into a
    scratch output).  Candidates that fail to compile or launch are skipped.
    """
    gpu = torch.cuda.get_device_name(device)
    full = f"{kernel}|{key}"
    table = _load(gpu)
    if full in table:
        return tuple(table[full])
    if os.environ.get("WORKBENCH_TUNE") != "1" or os.environ.get("WORKBENCH_NO_TUNE"):
        return default  # opt-in (see the module docstring)
    if torch.cuda.is_current_stream_capturing():
        return default
    best, best_ms = default, float("inf")
    for cand in candidates:
        try:
            run(cand)  # compile + warm up
            ms = statistics.median(_time_once(lambda c=cand: run(c), device) for _ in range(reps))
        except Exception:  # noqa: BLE001 - a shape the compiler or the device rejects is not a choice
            continue
        if ms < best_ms:
            best, best_ms = cand, ms
    table[full] = list(best)
    _save(gpu)
    return best


def tuned_table(device: torch.device | None = None) -> dict[str, list]:
    """Every cached choice for this GPU (for benchmarks' records)."""
    return dict(_load(torch.cuda.get_device_name(device)))


# candidate launch shapes of the CUDA-core GEMV (GemvConfig fields) and the tensor-core GEMM (GemmConfig)
GEMV_CANDIDATES = [
    (16, 128, 1, 4),
    (8, 128, 1, 1),
    (4, 128, 1, 1),
    (8, 128, 2, 1),
    (8, 128, 4, 1),
    (8, 64, 1, 1),
]
GEMM_CANDIDATES_16 = [
    (16, 64, 128, 1, 4, 3),
    (16, 32, 128, 1, 4, 3),
    (16, 64, 64, 1, 4, 4),
    (16, 64, 128, 4, 4, 3),
]
GEMM_CANDIDATES = [
    (64, 64, 128, 1, 4, 3),
    (64, 64, 64, 1, 4, 4),
    (64, 32, 128, 1, 4, 3),
    (128, 128, 64, 1, 8, 3),
]


def shape_key(x: torch.Tensor, N: int, K: int, bits: int, group_size: int, has_zero: bool, fp8: bool) -> str:
    """Cache key of one problem: format, rows, N, K, grouping, zero points, activation dtype."""
    fmt = "fp8" if fp8 else f"w{bits}"
    g = "ch" if group_size >= K else f"g{group_size}"
    return f"{fmt}|M{x.shape[0]}|N{N}|K{K}|{g}|{'asym' if has_zero else 'sym'}|{str(x.dtype)[6:]}"


def tunable(x: torch.Tensor) -> bool:
    """Tuning applies on CUDA only (the interpreter / CPU use the defaults)."""
    return x.is_cuda
