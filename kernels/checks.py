"""Launcher plumbing shared by the kernels: input checks with one-line errors, output allocation.

Every launcher calls these before launching, so a bad call fails with a message that names the tensor
and its shape instead of a Triton crash or a silently wrong result.  Split-K launches accumulate into a
zeroed fp32 buffer with atomics; ``alloc_output`` / ``finish_output`` hide that from the launchers.  Two
alternatives finish split-K without those launches: the in-kernel fix-up (``fixup_enabled``) and the
per-split partials summed by the caller (``split_partials_enabled``, ``alloc_partials``).
"""

from __future__ import annotations

import os

import torch

from workbench.errors import WorkbenchError
from workbench.quant.packing import SUPPORTED_BITS, n_groups, packed_words

ACT_DTYPES = (torch.float16, torch.bfloat16)


def check_activation(x: torch.Tensor, K: int, name: str) -> None:
    """x must be fp16/bf16 [M, K] with unit stride along K."""
    if x.dtype not in ACT_DTYPES:
        raise WorkbenchError(f"{name}: x must be float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != K:
        raise WorkbenchError(f"{name}: x must be [M, K={K}], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise WorkbenchError(f"{name}: x has no rows (shape {tuple(x.shape)})")
    if x.stride(1) != 1:
        raise WorkbenchError(f"{name}: x must be contiguous along K (strides {x.stride()})")


def check_int_weight(
    name: str,
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
) -> int:
    """Validate a packed int weight against x; returns N."""
    if bits not in SUPPORTED_BITS:
        raise WorkbenchError(f"{name}: bits={bits} not supported (supported: {SUPPORTED_BITS})")
    check_activation(x, K, name)
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != packed_words(K, bits):
        raise WorkbenchError(
            f"{name}: packed weight must be int32 [N, {packed_words(K, bits)}] for K={K}, bits={bits}; "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    if not packed.is_contiguous():
        raise WorkbenchError(f"{name}: packed weight {tuple(packed.shape)} must be contiguous")
    N = packed.shape[0]
    ng = n_groups(K, group_size)
    if scales_t.shape != (ng, N) or scales_t.dtype != torch.float16 or not scales_t.is_contiguous():
        raise WorkbenchError(
            f"{name}: scales must be contiguous float16 [n_groups={ng}, N={N}] (prepare_group_params); "
            f"got {scales_t.dtype} {tuple(scales_t.shape)}"
        )
    if zeros_t is not None and (
        zeros_t.shape != (ng, N) or zeros_t.dtype != torch.float16 or not zeros_t.is_contiguous()
    ):
        raise WorkbenchError(
            f"{name}: zeros must be contiguous float16 [{ng}, {N}] or None; got {zeros_t.dtype} "
            f"{tuple(zeros_t.shape)}"
        )
    tensors = [x, packed, scales_t] + ([zeros_t] if zeros_t is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise WorkbenchError(f"{name}: inputs on different devices: {[str(t.device) for t in tensors]}")
    return N


def check_fp8_weight(name: str, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, K: int) -> int:
    """Validate packed FP8 E4M3 patterns int32 [N, packed_words(K, 8)] and fp32 scales [N]; returns N."""
    check_activation(x, K, name)
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != packed_words(K, 8):
        raise WorkbenchError(
            f"{name}: packed fp8 weight must be int32 [N, {packed_words(K, 8)}] for K={K} "
            f"(prepare_fp8_params); got {packed.dtype} {tuple(packed.shape)}"
        )
    if not packed.is_contiguous():
        raise WorkbenchError(f"{name}: packed fp8 weight {tuple(packed.shape)} must be contiguous")
    N = packed.shape[0]
    if scales.shape != (N,) or scales.dtype != torch.float32 or not scales.is_contiguous():
        raise WorkbenchError(
            f"{name}: fp8 scales must be contiguous float32 [N={N}], got {scales.dtype} {tuple(scales.shape)}"
        )
    if len({x.device, packed.device, scales.device}) != 1:
        raise WorkbenchError(
            f"{name}: inputs on different devices: {x.device}, {packed.device}, {scales.device}"
        )
    return N


def group_tile(group_size: int, K: int, per: int, name: str) -> tuple[bool, int]:
    """(per_channel, G) for the kernels: G must be a power of two in 32..256 (whole 32-column chunks)."""
    if group_size >= K:
        return True, K
    if group_size < 32 or group_size & (group_size - 1):
        raise WorkbenchError(
            f"{name}: group_size={group_size} is not supported by the kernels (needs a power of two in "
            f"32..256, or per-channel); use the torch reference"
        )
    return False, group_size


def split_tiles(tiles: int, split_k: int) -> tuple[int, int]:
    """(programs along K, tiles per program) for a requested split-K; never an empty program."""
    split = max(1, min(split_k, tiles))
    per = -(-tiles // split)
    return -(-tiles // per), per


def alloc_output(name: str, out: torch.Tensor | None, x: torch.Tensor, N: int, split: int) -> torch.Tensor:
    """The buffer the kernel writes: ``out`` (checked) or a new [M, N] in x.dtype; fp32 zeros for split-K."""
    M = x.shape[0]
    if out is not None and (out.shape != (M, N) or out.dtype != x.dtype or not out.is_contiguous()):
        raise WorkbenchError(
            f"{name}: out must be contiguous {x.dtype} [{M}, {N}], got {out.dtype} {tuple(out.shape)}"
        )
    if split > 1:
        return torch.zeros(M, N, dtype=torch.float32, device=x.device)
    return out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)


def finish_output(y: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cast a split-K fp32 buffer back to the activation dtype (into ``out`` when given)."""
    if y.dtype == dtype:
        return y
    if out is not None:
        return out.copy_(y)
    return y.to(dtype)


def fixup_enabled(default: bool) -> bool:
    """Split-K finished inside the kernel (fp32 sums into a persistent workspace, the last program of a
    column block casts, writes and re-zeroes) instead of a zero-fill and a cast launch around it.
    ``WORKBENCH_SPLIT_FIXUP=1`` / ``0`` forces it on / off for every kernel; otherwise the kernel's
    ``default`` (measured per kernel on the H200: ``benchmarks/RESULTS.md``, issue 13, fourth session)."""
    env = os.environ.get("WORKBENCH_SPLIT_FIXUP")
    return default if env is None else env != "0"


def split_partials_enabled() -> bool:
    """Split-K GEMVs write each split's fp32 partial sums to their own slice of a [split, M, N] buffer with
    plain stores (no zero-fill, no atomics), and the caller sums them outside the custom op
    (``kernels/split_partials.py``), where ``torch.compile`` fuses the sum and the cast into the next op
    (the residual add).  Opt-in, ``WORKBENCH_SPLIT_PARTIALS=1``, not yet measured on a GPU; it takes
    precedence over the fix-up for the launches it covers (GEMV, <= 4 rows).  Read when the launch is
    planned: a compiled graph keeps the choice it was traced with."""
    return os.environ.get("WORKBENCH_SPLIT_PARTIALS", "0") == "1"


def alloc_partials(name: str, out: torch.Tensor | None, x: torch.Tensor, N: int, split: int) -> torch.Tensor:
    """The fp32 [split, M, N] buffer of a split-K partials launch: ``out`` (checked) or a new one, not
    zeroed (every program stores its whole slice)."""
    shape = (split, x.shape[0], N)
    if out is not None and (out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous()):
        raise WorkbenchError(
            f"{name}: partials out must be contiguous float32 {list(shape)}, got {out.dtype} "
            f"{tuple(out.shape)}"
        )
    return out if out is not None else torch.empty(shape, dtype=torch.float32, device=x.device)


_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def split_workspace(x: torch.Tensor, N: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Persistent zeroed fp32 [16, N] sums and int32 counters (one per column block) for the in-kernel
    split-K fix-up; every launch leaves them at zero (one stream at a time; rows >= M stay unused).
    None while a CUDA graph is captured and none exists yet (the caller then zero-fills and casts)."""
    key = (x.device.type, x.device.index, N, block_n)
    if key not in _WORKSPACE:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        ws = torch.zeros(16, N, dtype=torch.float32, device=x.device)
        _WORKSPACE[key] = (ws, torch.zeros(-(-N // block_n), dtype=torch.int32, device=x.device))
    return _WORKSPACE[key]
