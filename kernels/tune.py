"""Launch shapes chosen per GPU by timing, cached on disk as JSON (no device constants in code).

The first call of a tuned kernel for a (GPU name, kernel, shape) key times each candidate launch shape
on the real inputs (L2 flushed before every timed launch, median of a few) and keeps the fastest; the
choice is written to ``$WORKBENCH_TUNE_CACHE`` (default ``~/.cache/workbench/kernel_tune.json``), one
object ``{"<gpu name>": {"<key>": [params...]}}``, and read back by later processes.  Picks measured on
the lent GPUs ship beside this file (``tuned_launch_shapes.json``, same form) and are used where the
user cache has no entry; a GPU or shape in neither takes the launcher's heuristic.  While a CUDA graph
is being captured nothing can be timed: the caller's heuristic shape is used and nothing is cached.

Opt-in: timing passes run only with ``WORKBENCH_TUNE=1`` (a cached choice is used either way).  Each
candidate is timed like ``benchmarks/bench_kernels.py`` does (CUDA graph of 20 launches over weight
copies >= 3x L2).  The first version timed one launch after an L2 flush; on the H200 (2026-12-02,
``benchmarks/RESULTS.md``) that ranked 10-25 us kernels by launch overhead and split-K's extra memset /
cast launches and picked worse shapes than the defaults.  With graph timing (H200, issue 13) the picks
match the benchmark's times; ``TIMES`` keeps every candidate's time of this process's passes.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

_MEM: dict[str, dict[str, list]] = {}
_USER: dict[str, dict[str, list]] = {}  # the choices of the user cache and this process (what _save writes)
TIMES: dict[str, dict[str, float | str]] = {}  # key -> {candidate: us} of this process's timing passes


def cache_path() -> Path:
    """The JSON file holding the tuned launch shapes."""
    env = os.environ.get("WORKBENCH_TUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "workbench" / "kernel_tune.json"


SHIPPED = Path(__file__).with_name("tuned_launch_shapes.json")  # picks measured on lent GPUs, per name


def _read(path: Path, gpu: str) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
        return {k: list(v) for k, v in data.get(gpu, {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _load(gpu: str) -> dict[str, list]:
    """This GPU's choices: the shipped table (``tuned_launch_shapes.json``) overlaid by the user cache."""
    if gpu not in _MEM:
        _USER[gpu] = _read(cache_path(), gpu)
        _MEM[gpu] = {**_read(SHIPPED, gpu), **_USER[gpu]}
    return _MEM[gpu]


def _save(gpu: str) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data.setdefault(gpu, {}).update(_USER.get(gpu, {}))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: keep the choice in memory only


GRAPH_LAUNCHES = 20


def time_graph(fn: Callable[[], object], reps: int = 5) -> float:
    """Median ms of one ``fn()`` replayed inside a CUDA graph of ``GRAPH_LAUNCHES`` calls.

    As in ``benchmarks/bench_kernels.py``: ``fn`` should rotate through enough weight copies
    (``rotated_copies``) that L2 cannot hold them; warm-up (compilation) happens before the capture.
    """
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_LAUNCHES):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / GRAPH_LAUNCHES)
    del graph
    return statistics.median(times)


def rotated_copies(tensors: Sequence[torch.Tensor | None]) -> list[tuple]:
    """The tensors (first) plus clones, so that one cycle through them moves >= 3x the GPU's L2."""
    live = [t for t in tensors if t is not None]
    nbytes = sum(t.numel() * t.element_size() for t in live)
    l2 = torch.cuda.get_device_properties(live[0].device).L2_cache_size
    n = max(2, -(-3 * l2 // max(nbytes, 1)))
    clone = lambda t: None if t is None else t.clone()  # noqa: E731
    return [tuple(tensors)] + [tuple(clone(t) for t in tensors) for _ in range(n - 1)]


def pick(
    kernel: str,
    key: str,
    device: torch.device,
    candidates: Sequence[tuple],
    make_run: Callable[[], Callable[[tuple], object]],
    default: tuple,
    reps: int = 5,
) -> tuple:
    """The fastest of ``candidates`` for ``kernel``/``key`` on this GPU (cached), or ``default``.

    ``make_run()`` (called only when a timing pass runs) returns ``run(params)``, which launches the
    kernel once with a candidate's parameters (into a scratch output, rotating its weights through
    ``rotated_copies``); each candidate is timed by ``time_graph``.  Candidates that fail to compile,
    launch or capture are skipped.
    """
    gpu = _gpu_name(device)
    full = f"{kernel}|{key}"
    table = _load(gpu)
    if full in table:
        return tuple(table[full])
    enabled = _STATE["enabled"]
    if enabled is None:
        enabled = os.environ.get("WORKBENCH_TUNE") == "1" and not os.environ.get("WORKBENCH_NO_TUNE")
    if not enabled:
        return default  # opt-in (see the module docstring)
    if torch.cuda.is_current_stream_capturing():
        return default
    best, best_ms = default, float("inf")
    run = make_run()
    seen = TIMES.setdefault(full, {})
    for cand in candidates:
        try:
            ms = time_graph(lambda c=cand: run(c), reps)
        except Exception as e:  # noqa: BLE001 - a shape the compiler or the device rejects is not a choice
            seen[str(list(cand))] = f"failed: {type(e).__name__}"
            continue
        seen[str(list(cand))] = round(ms * 1000, 2)
        if ms < best_ms:
            best, best_ms = cand, ms
    table[full] = list(best)
    _USER.setdefault(gpu, {})[full] = list(best)
    _save(gpu)
    return best


def lookup(kernel: str, key: str, device: torch.device) -> tuple | None:
    """This GPU's cached choice for ``kernel``/``key`` (shipped table or user cache), or None; never times."""
    hit = _load(_gpu_name(device)).get(f"{kernel}|{key}")
    return tuple(hit) if hit is not None else None


def tuned_table(device: torch.device | None = None) -> dict[str, list]:
    """Every cached choice for this GPU (for benchmarks' records)."""
    return dict(_load(_gpu_name(device)))


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
    return problem_key(x.shape[0], x.dtype, N, K, bits, group_size, has_zero, fp8)


def problem_key(
    M: int, dtype: torch.dtype, N: int, K: int, bits: int, group_size: int, has_zero: bool, fp8: bool
) -> str:
    """``shape_key`` from the rows and activation dtype instead of x."""
    fmt = "fp8" if fp8 else f"w{bits}"
    g = "ch" if group_size >= K else f"g{group_size}"
    return f"{fmt}|M{M}|N{N}|K{K}|{g}|{'asym' if has_zero else 'sym'}|{str(dtype)[6:]}"


def tunable(x: torch.Tensor) -> bool:
    """Look up / tune a launch shape: CUDA only, and only with timing enabled or a cache file present
    (otherwise the launchers take their heuristic shape at the cost of this check alone)."""
    if not x.is_cuda:
        return False
    if _STATE["enabled"] is None:  # read the environment once per process (``enable`` overrides)
        _STATE["enabled"] = os.environ.get("WORKBENCH_TUNE") == "1" and not os.environ.get(
            "WORKBENCH_NO_TUNE"
        )
        _STATE["cache"] = cache_path().exists() or SHIPPED.exists()
    return bool(_STATE["enabled"] or _STATE["cache"])


def enable(flag: bool) -> None:
    """Turn timing passes on or off for this process (instead of ``WORKBENCH_TUNE``)."""
    _STATE["enabled"] = flag
    _STATE["cache"] = cache_path().exists() or SHIPPED.exists()


_STATE: dict[str, bool | None] = {"enabled": None, "cache": None}
_GPU: dict[object, str] = {}


def _gpu_name(device: torch.device | None) -> str:
    key = None if device is None else torch.device(device).index
    if key not in _GPU:
        _GPU[key] = torch.cuda.get_device_name(device)
    return _GPU[key]


def rotating_runner(launch: Callable, weights: Sequence[torch.Tensor | None]) -> Callable[[tuple], object]:
    """``run(params)`` for ``pick``: ``launch(params, *weights_copy)`` cycling through ``rotated_copies``."""
    copies = rotated_copies(weights)
    turn = itertools.count()
    return lambda c: launch(c, *copies[next(turn) % len(copies)])
