"""GPTQ: one-shot weight quantization with second-order error compensation.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
https://arxiv.org/abs/2210.17323 (reference code: https://github.com/IST-DASLab/gptq).

Columns are quantized one at a time; the error of each column is spread over the not-yet-quantized columns
through the upper Cholesky factor of H^-1, with H = 2 X^T X + damp * I. Updates inside a block of columns are
applied immediately and to the rest of the matrix once per block ("lazy batch updates").

Details of this implementation:
- dampening: damp = percdamp * mean(diag(H)) is added to the diagonal; columns whose input is always zero
  (diag(H) = 0, "dead") get diag 1 so H stays invertible. A singular H (fewer samples than K, duplicate
  inputs) is therefore fine. If the Cholesky factorisation still fails, damp is multiplied by 10 and retried.
- group parameters: without act-order, the scale/zero of a group is computed from the *updated* weights when
  the group's first column is reached (block size is rounded to a multiple of the group size so a group
  never straddles two blocks). With act-order (columns processed by decreasing diag(H)), groups are static:
  parameters are computed from the original weights for groups of consecutive original columns, so codes
  stay in original column order and the runtime needs no permutation. Per-channel and per-tensor
  parameters are always computed from the original weights.
- `clip=True` searches a range shrink per group on the weight squared error (GPTQ's `mse` option).
Works for every integer spec (group / channel / tensor, symmetric / asymmetric).
"""

from __future__ import annotations

import time
import warnings

import torch

from workbench.quant.formats import int_decode, int_encode, int_params, int_zero, to_groups
from workbench.quant.spec import QuantSpec


def _params(Wg: torch.Tensor, spec: QuantSpec, clip: bool, grid: int, max_shrink: float):
    """Scales / zeros [R, ng] for grouped weights Wg [R, ng, G], with the optional shrink search."""
    b, sym = spec.bits, spec.symmetric
    if not clip:
        return int_params(Wg, b, sym)
    best_s, best_z = int_params(Wg, b, sym)
    best_err = None
    for i in range(grid):
        p = 1.0 - max_shrink * i / grid
        s, z = int_params(Wg, b, sym, p)
        zz = int_zero(b, sym, z)
        err = ((Wg - int_decode(int_encode(Wg, s, zz, b), s, zz)) ** 2).sum(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp I)^-1 (float32), raising damp until it factorises."""
    for _ in range(8):
        Hd = H.clone()
        Hd.diagonal().add_(damp)  # = H + damp * I, without a K x K identity
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd  # at most three K x K float64 matrices alive (a 28672-wide down_proj: 6.6 GB each)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0:
                return U.float(), damp
        damp = damp * 10 if damp > 0 else 1e-6
    raise AssertionError("GPTQ: Hessian not positive definite even with strong dampening")


class _KernelUnavailable(RuntimeError):
    """The column kernel could not run its first block (no triton, a compile or launch error)."""


_MAX_KERNEL_BLOCK = 256  # kernels/gptq_block.MAX_BLOCK (not imported at module level: triton is optional)


def _torch_blocks(W, Hinv, codes, scales, zeros, spec, col_group, blocksize, dynamic, clip_args) -> None:
    """GPTQ's block loop in torch ops, one column at a time (the CPU path; module docstring)."""
    N, K = W.shape
    G, sym, maxq = spec.group_size, spec.symmetric, 2**spec.bits - 1
    per_tensor = spec.granularity == "tensor"
    fixed_zero = float(2 ** (spec.bits - 1))
    B = G * max(1, blocksize // G) if dynamic else blocksize
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2].clone()  # [N, B]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic and j % G == 0:
                s, z = _params(W1[:, i : i + G].unsqueeze(1), spec, *clip_args)
                scales[:, j // G] = s[:, 0]
                if zeros is not None:
                    zeros[:, j // G] = z[:, 0]
            g = col_group[j]
            if per_tensor:
                s = scales[0, 0]
                z = fixed_zero if sym else zeros[0, 0]
            else:
                s = scales[:, g]
                z = fixed_zero if sym else zeros[:, g]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            codes[:, j] = q.to(torch.uint8)
            err = (w - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        if i2 < K:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]


def _kernel_blocks(W, Hinv, codes, scales, zeros, spec, col_group, blocksize, dynamic, clip_args) -> None:
    """GPTQ's block loop with each block's columns in one `gptq_block` launch (codes and the dynamic group
    parameters written in place). Dynamic groups: one block per group, its parameters computed from the
    updated weights before the launch (what the torch loop does at the group's first column); otherwise
    blocks of `blocksize` columns with each column's static scale / zero gathered."""
    try:
        from workbench.kernels.gptq_block import gptq_block
    except ImportError as exc:  # no triton
        raise _KernelUnavailable(str(exc)) from exc

    N, K = W.shape
    G = spec.group_size
    B = G if dynamic else min(blocksize, _MAX_KERNEL_BLOCK)
    maxq = float(2**spec.bits - 1)
    fixed = torch.full((1, 1), float(2 ** (spec.bits - 1)), device=W.device)
    cg = torch.tensor(col_group, device=W.device)
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2]
        if dynamic:
            s, z = _params(W1.unsqueeze(1), spec, *clip_args)  # [N, 1]
            scales[:, i1 // G] = s[:, 0]
            if zeros is not None:
                zeros[:, i1 // G] = z[:, 0]
        else:
            idx = cg[i1:i2]
            s = scales[:, idx] if scales.shape[0] == N else scales[0, 0].expand(N, i2 - i1)
            z = None if zeros is None else (zeros[:, idx] if zeros.shape[0] == N else zeros[0, 0])
        S1 = s.expand(N, i2 - i1)
        Z1 = (fixed if z is None else z).expand(N, i2 - i1)
        try:
            codes[:, i1:i2], err1 = gptq_block(W1, Hinv[i1:i2, i1:i2].contiguous(), S1, Z1, maxq)
        except Exception as exc:  # a kernel that cannot compile or launch here fails on its first block
            if i1 > 0:
                raise
            raise _KernelUnavailable(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
        if i2 < K:
            W[:, i2:] -= err1 @ Hinv[i1:i2, i2:]


def gptq_quantize(
    W: torch.Tensor,
    spec: QuantSpec,
    gram: torch.Tensor,
    percdamp: float = 0.01,
    blocksize: int = 128,
    act_order: bool = False,
    clip: bool = False,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    column_kernel: bool | None = None,
):
    """Quantize W [N, K] with GPTQ for an integer spec.

    Args:
        W: [N, K] float weight (finite).
        spec: an integer QuantSpec (any granularity, sym or asym).
        gram: [K, K] X^T X of the layer's calibration inputs (finite); H = 2 gram.
        percdamp: dampening as a fraction of mean(diag(H)).
        blocksize: columns per lazy-update block.
        act_order: process columns by decreasing diag(H) (static groups; codes in original order).
        clip, clip_grid, max_shrink: optional per-group range shrink search (weight squared error).
        column_kernel: run each block's column loop as one Triton launch (`kernels/gptq_block.py`; blocks
            of one group for grouped specs); default: when W is on CUDA. False: the torch loop below
            (quantize_weight's path on the CPU).
    Returns:
        codes uint8 [N, K] (original column order), scales [N, ng] (or [1, 1] per tensor),
        zeros like scales or None (symmetric), info dict (damp, act_order, seconds).
    """
    assert spec.is_int, f"GPTQ needs an integer spec, got {spec}"
    t0 = time.perf_counter()
    N, K = W.shape
    W = W.float().clone()
    dev = W.device  # runs where W is (the CPU for quantize_weight; the GPU for workbench.streaming)
    H = 2 * gram.to(dev).double()
    H = (H + H.T) / 2
    diag = H.diagonal().clone()
    dead = diag == 0
    H.diagonal()[dead] = 1.0
    damp = percdamp * float(H.diagonal().mean())

    clip_args = (clip, clip_grid, max_shrink)
    sym = spec.symmetric
    G = spec.group_size
    dynamic = spec.granularity == "group" and not act_order
    if spec.granularity == "group":
        if dynamic:
            ng = -(-K // G)
            scales = torch.zeros(N, ng, device=dev)
            zeros = None if sym else torch.zeros(N, ng, device=dev)
        else:
            scales, zeros = _params(to_groups(W, G), spec, clip, clip_grid, max_shrink)
    elif spec.granularity == "channel":
        scales, zeros = _params(W.unsqueeze(1), spec, clip, clip_grid, max_shrink)
    else:
        scales, zeros = _params(W.reshape(1, 1, -1), spec, clip, clip_grid, max_shrink)

    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = torch.arange(K, device=dev)
    col_group = perm // G if spec.granularity == "group" else torch.zeros(K, dtype=torch.long, device=dev)
    col_group = col_group.tolist()

    Hinv, damp = _inverse_cholesky(H, damp)
    codes = torch.empty(N, K, dtype=torch.uint8, device=dev)
    kernel = W.is_cuda if column_kernel is None else column_kernel
    loop = "triton" if kernel and not (dynamic and G > _MAX_KERNEL_BLOCK) else "torch"
    args = (W, Hinv, codes, scales, zeros, spec, col_group, blocksize, dynamic, clip_args)
    try:
        (_kernel_blocks if loop == "triton" else _torch_blocks)(*args)
    except _KernelUnavailable as exc:  # before the first block was applied: nothing to undo
        warnings.warn(f"GPTQ: the column kernel failed on its first launch ({exc}); running the torch loop")
        loop = f"torch (kernel failed: {exc})"
        _torch_blocks(*args)

    if act_order:
        codes = codes[:, torch.argsort(perm)]
    info = {
        "damp": damp,
        "act_order": act_order,
        "dead_columns": int(dead.sum()),
        "column_loop": loop,
        "seconds": time.perf_counter() - t0,
    }
    return codes, scales, zeros, info
