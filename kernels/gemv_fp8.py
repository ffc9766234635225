"""GEMV for 1-4 rows with FP8 E4M3 weights: y = x @ (fp8(W) * scale[n])^T.

The same kernel as ``gemv_int`` (``_gemv_kernel`` with ``FP8=True``): the E4M3 bit patterns are packed
like 8-bit codes (``packing.prepare_fp8_params``) and each byte's sign / exponent / mantissa fields are
moved into an fp32 with integer ops only (exact for normals and subnormals), so it runs the same in
the Triton interpreter and on any GPU.  Reference: ``reference.gemv_fp8_ref``.
"""

from __future__ import annotations

import torch
from workbench.kernels.checks import check_fp8_weight
from workbench.kernels.gemv_int import GemvConfig, launch_gemv


def gemv_fp8(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    K: int,
    config: GemvConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W)^T for 1..4 rows, FP8 E4M3 weights.

    Args:
        x: fp16/bf16 [M, K], M <= 4, contiguous along K.
        packed: int32 [N, packed_words(K, 8)]: the uint8 E4M3 patterns packed as 8-bit codes.
        scales: fp32 [N] per output channel.  K: input features.
        config: launch shape; out: optional [M, N] output in x.dtype (fully overwritten).
    Returns:
        y: [M, N] in x.dtype.
    """
    N = check_fp8_weight("gemv_fp8", x, packed, scales, K)
    return launch_gemv("gemv_fp8", x, packed, scales.view(1, N), None, 8, K, K, N, True, config, out)
