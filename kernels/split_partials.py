"""Split-K finished by the caller: the launch planned before the op, per-split fp32 slices, their sum.

Opt-in with ``WORKBENCH_SPLIT_PARTIALS=1`` (``checks.split_partials_enabled``).  By default a split-K GEMV
adds its partial sums with fp32 atomics into a zero-filled buffer and casts it back (two extra small
launches per linear), or finishes inside the kernel (``checks.fixup_enabled``).  Here each split program
stores its partial tile with plain stores into its own slice of an fp32 ``[split, M, N]`` buffer (no
zero-fill, no atomics), and the sum over splits plus the cast to the activation dtype run in torch code
after the custom op (``workbench.runtime.qlinear``):

    plan = plan_split(M, N, K, bits, group_size, has_zero, fp8, x.dtype, x.device)   # None: no split
    partials = gemv_int_partials(x, packed, scales_t, zeros_t, bits, group_size, K, plan)  # [split, M, N]
    y = finish_partials(partials, x.dtype)                                            # [M, N]

Under ``torch.compile`` ``finish_partials`` is ``partials.sum(0).to(dtype)``, which inductor fuses into the
op that reads y (the residual add and the norm after o_proj / down_proj); eagerly and in CUDA graphs it is
one Triton reduction (``sum_partials``; that torch expression, ``sum_partials_ref``, is its reference).

The op's fake implementation must return ``[split, M, N]``, so the split is decided before the op runs:
``plan_split`` makes the choice the launcher would make (``gemv_mma.planned_w4`` / ``default_shape`` for W4
on the tensor cores, ``gemv_int.default_gemv_config`` or this GPU's cached tuned shape otherwise) and
hands it to the op explicitly.  It never runs a timing pass: a shape missing from the tuning cache takes
the heuristic (tune on the default path first, ``WORKBENCH_TUNE=1``).  It is a
``torch.compiler.assume_constant_result``: dynamo calls it while tracing and keeps the plan as constants.

Plans (tuples of ints): ``(0, block_n, split_k, two_steps, split)`` for the W4 tensor-core kernel,
``(1, block_n, tile_words, split_k, num_warps, split)`` for the CUDA-core GEMV; ``split`` is the number of
programs along K (slices of the buffer), which can be below the requested ``split_k``.
References: ``reference.gemv_int_partials_ref`` / ``gemv_fp8_partials_ref``; ``sum_partials_ref``.
"""

from __future__ import annotations

from dataclasses import astuple

import torch
import triton
import triton.language as tl
from workbench.kernels import tune
from workbench.kernels.checks import check_fp8_weight, check_int_weight, split_partials_enabled, split_tiles
from workbench.kernels.gemv_int import (
    MAX_GEMV_ROWS,
    GemvConfig,
    default_gemv_config,
    gemv_tiles,
    launch_gemv,
)
from workbench.kernels.gemv_mma import (
    STEP_COLS,
    launch_w4_mma,
    mma_applies,
    mma_eligible,
    mma_split,
    planned_w4,
)

from workbench.errors import WorkbenchError

W4_MMA, GEMV = 0, 1  # the plan's first entry: which kernel
_PARAMS = {W4_MMA: 3, GEMV: 4}  # launch parameters after the kind


def planned_launch(
    M: int,
    N: int,
    K: int,
    bits: int,
    group_size: int,
    has_zero: bool,
    fp8: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[int, ...]:
    """(kind, *launch parameters) that ``gemv_int`` / ``gemv_fp8`` would launch for x [M, K] of ``dtype`` on
    ``device`` against an [N, K] weight, from the heuristic or the cached tuned choice (no timing).
    fp8: ``bits`` 8 and ``group_size`` K, as ``gemv_fp8`` passes them."""
    if not fp8 and mma_applies(M, dtype, device, bits, group_size, K):
        return planned_w4(M, dtype, device, group_size, K, N, has_zero)
    cfg = astuple(default_gemv_config(M, N, K, bits))
    if device.type == "cuda":
        key = tune.problem_key(M, dtype, N, K, bits, group_size, has_zero, fp8)
        cfg = tune.lookup("gemv", key, device) or cfg
    return (GEMV, *cfg)


def launch_split(launch: tuple[int, ...], K: int, bits: int, group_size: int) -> int:
    """Programs along K (slices of the partials buffer) of a ``planned_launch`` answer."""
    kind, params = launch[0], launch[1:]
    if kind == W4_MMA:
        return mma_split(K, params[1])[0]
    _, _, tiles = gemv_tiles(GemvConfig(*params), K, bits, group_size)
    return split_tiles(tiles, params[2])[0]


def split_columns(plan: tuple[int, ...], K: int, bits: int, group_size: int) -> int:
    """Columns of K that each split program of ``plan`` covers (the last one may cover fewer)."""
    kind, params, _ = _check_plan("split_columns", plan)
    if kind == W4_MMA:
        return mma_split(K, params[1])[1] * STEP_COLS
    gw, c, tiles = gemv_tiles(GemvConfig(*params), K, bits, group_size)
    per = 16 if bits == 3 else 32 // bits
    return split_tiles(tiles, params[2])[1] * c * gw * per


@torch.compiler.assume_constant_result
def plan_split(
    M: int,
    N: int,
    K: int,
    bits: int,
    group_size: int,
    has_zero: bool,
    fp8: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[int, ...] | None:
    """The split-K partials plan ``(kind, *params, split)`` for this GEMV, or None: partials off
    (``WORKBENCH_SPLIT_PARTIALS``), more than ``MAX_GEMV_ROWS`` rows (the GEMM), or no split-K."""
    if not split_partials_enabled() or M > MAX_GEMV_ROWS:
        return None
    launch = planned_launch(M, N, K, bits, group_size, has_zero, fp8, dtype, device)
    split = launch_split(launch, K, bits, group_size)
    return (*launch, split) if split > 1 else None


def _check_plan(name: str, plan: tuple[int, ...]) -> tuple[int, tuple[int, ...], int]:
    kind = plan[0] if plan else None
    if kind not in _PARAMS or len(plan) != _PARAMS[kind] + 2:
        raise WorkbenchError(
            f"{name}: plan must be (0, block_n, split_k, two_steps, split) or (1, block_n, tile_words, "
            f"split_k, num_warps, split) (plan_split); got {tuple(plan)}"
        )
    return kind, tuple(plan[1:-1]), plan[-1]


def _checked(name: str, y: torch.Tensor, split: int, plan: tuple[int, ...]) -> torch.Tensor:
    assert y.shape[0] == split, f"{name}: plan {tuple(plan)} says {split} splits, the launch has {y.shape[0]}"
    return y


def gemv_int_partials(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
    plan: tuple[int, ...],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-split partial sums of y = x @ dequant(W)^T (integer weights), launched as ``plan`` says.

    Args: as ``gemv_int`` (x fp16/bf16 [M <= 4, K], packed int32 [N, words], scales_t / zeros_t fp16
        [n_groups, N]); plan from ``plan_split``; out: optional fp32 [split, M, N] (fully overwritten).
    Returns:
        fp32 [split, M, N]; their sum over dim 0 is y.
    """
    name = "gemv_int_partials"
    N = check_int_weight(name, x, packed, scales_t, zeros_t, bits, group_size, K)
    kind, params, split = _check_plan(name, plan)
    if kind == W4_MMA:
        if bits != 4:
            raise WorkbenchError(
                f"{name}: plan {tuple(plan)} is for the W4 tensor-core kernel, got bits={bits}"
            )
        if not mma_eligible(x, bits, group_size, K):  # a view with an odd offset: an aligned copy
            x = x.clone(memory_format=torch.contiguous_format)
        block_n, split_k, two_steps = params
        y = launch_w4_mma(
            x, packed, scales_t, zeros_t, group_size, K, N, block_n, split_k, out, two_steps, True
        )
    else:
        cfg = GemvConfig(*params)
        y = launch_gemv(name, x, packed, scales_t, zeros_t, bits, group_size, K, N, False, cfg, out, True)
    return _checked(name, y, split, plan)


def gemv_fp8_partials(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    K: int,
    plan: tuple[int, ...],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``gemv_int_partials`` for FP8 E4M3 weights (args as ``gemv_fp8``); fp32 [split, M, N]."""
    name = "gemv_fp8_partials"
    N = check_fp8_weight(name, x, packed, scales, K)
    kind, params, split = _check_plan(name, plan)
    if kind != GEMV:
        raise WorkbenchError(f"{name}: fp8 weights run the CUDA-core GEMV (plan kind 1), got {tuple(plan)}")
    cfg = GemvConfig(*params)
    y = launch_gemv(name, x, packed, scales.view(1, N), None, 8, K, K, N, True, cfg, out, True)
    return _checked(name, y, split, plan)


@triton.jit
def _sum_partials_kernel(
    p_ptr,  # fp32 [SPLIT, MN]
    y_ptr,  # [MN] in the output dtype
    MN,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(p_ptr + offs, mask=mask, other=0.0)
    for k in tl.static_range(1, SPLIT):
        acc += tl.load(p_ptr + k * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


SUM_BLOCK = 1024


def sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y [M, N] in ``dtype`` = partials [split, M, N] fp32 summed over dim 0 in fp32, one launch."""
    if partials.dim() != 3 or partials.dtype != torch.float32 or not partials.is_contiguous():
        raise WorkbenchError(
            f"sum_partials: partials must be contiguous float32 [split, M, N], got {partials.dtype} "
            f"{tuple(partials.shape)}"
        )
    split, M, N = partials.shape
    y = torch.empty(M, N, dtype=dtype, device=partials.device)
    grid = (triton.cdiv(M * N, SUM_BLOCK),)
    _sum_partials_kernel[grid](partials, y, M * N, SPLIT=split, BLOCK=SUM_BLOCK, num_warps=4)
    return y


def sum_partials_ref(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The torch twin of ``sum_partials``: what inductor fuses into the consumer under ``torch.compile``."""
    return partials.sum(0).to(dtype)


def finish_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y [M, N] from the partials: torch ops while compiling (fused downstream), else ``sum_partials``."""
    if torch.compiler.is_compiling():
        return sum_partials_ref(partials, dtype)
    return sum_partials(partials, dtype)
