"""GEMM for larger batches / prefill with FP8 E4M3 weights, on tensor cores (``tl.dot``).

The same kernel as ``gemm_int`` (``_gemm_int_kernel`` with ``FP8=True``): the patterns are packed like
8-bit codes (``packing.prepare_fp8_params``), each weight tile is decoded to fp16 with integer ops (the
E4M3 value * 2**-8, exact; converted to bf16 for bf16 activations, also exact), multiplied with fp32
accumulation and scaled once per output channel.  Activations stay fp16/bf16 (weight-only
quantization).  Reference: ``reference.gemm_fp8_ref``.
"""

from __future__ import annotations

import torch
from workbench.kernels.checks import check_fp8_weight
from workbench.kernels.gemm_int import GemmConfig, launch_gemm


def gemm_fp8(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    K: int,
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W)^T for any number of rows, FP8 E4M3 weights, on tensor cores.

    Args:
        x: fp16/bf16 [M, K], contiguous along K.
        packed: int32 [N, packed_words(K, 8)]: the uint8 E4M3 patterns packed as 8-bit codes.
        scales: fp32 [N] per output channel.  K: input features.
        config: launch shape (default: ``default_gemm_config``); out: optional [M, N] output.
    Returns:
        y: [M, N] in x.dtype.
    """
    N = check_fp8_weight("gemm_fp8", x, packed, scales, K)
    return launch_gemm("gemm_fp8", x, packed, scales.view(1, N), None, 8, K, K, N, True, config, out)
