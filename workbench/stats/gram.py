"""Gram X^T X of one input stream on the GPU: bf16 inputs, float32 accumulation, upper block triangle only.

G is symmetric, so for a wide input (K > panel) only the panels on and above the diagonal are accumulated,
panel p (columns s..e) as G[:e, s:e] += X[:, :e]^T X[:, s:e]: with n = K / panel panels that is
(n + 1) / (2n) of the full product's FLOPs (57% at K = 28672, panel 4096). `mirror_upper` copies the upper
triangle onto the lower one before anyone reads G. Each panel is one GEMM G = G + A^T B (beta = 1, out_dtype
float32 where torch has it: bf16 / fp16 values are exact in the products, only the float32 sums round).
"""

from __future__ import annotations

import torch

PANEL = 4096  # columns per panel (a K <= PANEL input takes one full GEMM)


def _add_product(G: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """G += a^T b in float32; a [T, M], b [T, N] bf16 / fp16 / fp32, G [M, N] float32 (may be a view)."""
    if a.dtype in (torch.bfloat16, torch.float16):
        try:
            torch.addmm(G, a.t(), b, out_dtype=torch.float32, out=G)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
        try:
            G += torch.mm(a.t(), b, out_dtype=torch.float32)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True  # exact products: bf16/fp16 values are exact in TF32
        try:
            G.addmm_(a.t().float(), b.float())
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        return
    G.addmm_(a.t(), b)  # fp32 (or fp64) input: the matmul precision the user set


def gram_update(G: torch.Tensor, x: torch.Tensor, panel: int = PANEL) -> bool:
    """Add x^T x to G [K, K] for x [T, K]: in full when K <= panel (returns False), else the upper block
    triangle only (returns True: call `mirror_upper(G, panel)` before reading G)."""
    K = x.shape[1]
    if K <= panel:
        _add_product(G, x, x)
        return False
    for s in range(0, K, panel):
        e = min(s + panel, K)
        _add_product(G[:e, s:e], x[:, :e], x[:, s:e])
    return True


def mirror_upper(G: torch.Tensor, panel: int = PANEL) -> torch.Tensor:
    """Copy the panels above the diagonal onto the lower triangle (in place, strip by strip: no K x K
    temporary); the diagonal panels are already full. Returns G."""
    K = G.shape[0]
    for s in range(0, K, panel):
        e = min(s + panel, K)
        if e < K:
            G[e:, s:e].copy_(G[s:e, e:].t())
    return G
