"""AWQ-style activation-aware per-input-channel scaling.

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
https://arxiv.org/abs/2306.00978.

Input channels that carry large activations matter more. AWQ multiplies column k of W by
s_k = a_k^alpha (a_k = mean |x_k| or, from the Gram matrix, the RMS sqrt(G_kk)), quantizes W diag(s) and
divides the input by s at run time:

    y = x W^T ~= (x / s) Q(W diag(s))^T

alpha is chosen on a grid in [0, 1] by the layer output error tr(D G D^T) with the effective weight
W_eff = Q(W diag(s)) diag(1/s). alpha = 0 (s = 1) is plain RTN, so the search never does worse than RTN on
this criterion. s is normalised to geometric mean 1 (s / sqrt(max s * min s)) and rounded to fp16.
The output error is a sum over output rows; for very tall layers (lm_head: 49152 rows) the search uses an
evenly spaced subset of `search_rows` rows (an estimate of the criterion; the never-worse-than-RTN
guarantee then holds on those rows) and the chosen s is applied to the whole weight.

Where s lives (documented choice): it is kept *unfolded* as the runtime `input_scale` of QuantizedWeight
(y = (x / input_scale) @ dequantize_codes()^T). This is exact for every layer; folding 1/s into the
preceding RMSNorm weight (q/k/v, gate/up) or into v_proj/up_proj rows (o_proj, down_proj) is a later
optimisation of the runtime, not done here.
"""

from __future__ import annotations

import torch

from workbench.quant.formats import Encoded, grouped, round_fp16, ungrouped
from workbench.quant.registry import decode
from workbench.quant.rtn import rtn_quantize
from workbench.quant.spec import QuantSpec


def activation_scale(gram: torch.Tensor, act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-input-channel activation magnitude [K]: `act_scale` (mean |x|) if given, else sqrt(diag(G)).

    Channels with no activation are clamped to 1e-5 of the largest so that s stays positive.
    """
    a = act_scale.float() if act_scale is not None else gram.diagonal().float().clamp(min=0).sqrt()
    top = float(a.max())
    return a.clamp(min=top * 1e-5 if top > 0 else 1.0)


def awq_quantize(
    W: torch.Tensor,
    spec: QuantSpec,
    gram: torch.Tensor,
    grid: int = 20,
    act_scale: torch.Tensor | None = None,
    clip: bool = False,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    search_rows: int = 4096,
) -> tuple[Encoded, torch.Tensor, dict]:
    """Search the AWQ exponent and quantize W diag(s).

    Args:
        W: [N, K] float32 weight.
        spec: integer QuantSpec.
        gram: [K, K] X^T X of the layer's calibration inputs.
        grid: alpha candidates i / grid for i = 0..grid.
        act_scale: optional [K] mean |x| per input channel (else derived from diag(gram)).
        clip: after choosing alpha, run RTN's clipping search on W diag(s) with the scaled Gram
            diag(1/s) G diag(1/s) (output-error criterion).
        search_rows: rows used by the alpha search when N is larger (evenly spaced subset).
    Returns:
        (Encoded of W diag(s) in grouped layout, input_scale s [K] float32, info {"alpha", "rel_error"});
        rel_error is the relative output error of the chosen alpha on the searched rows, before clipping.
    """
    N, K = W.shape
    W = W.float()
    a = activation_scale(gram, act_scale)
    G = gram.float()
    rows = torch.linspace(0, N - 1, search_rows, device=W.device).round().long().unique()
    Ws = W[rows] if N > search_rows else W
    if spec.granularity == "tensor":
        Ws = W  # one scale over all rows: the subset would change it
    den = float(((Ws @ G).double() * Ws.double()).sum())
    best = None
    for i in range(grid + 1):
        alpha = i / grid
        s = a.pow(alpha)
        s = round_fp16(s / (s.max() * s.min()).sqrt())
        enc = rtn_quantize(Ws * s, spec)
        W_eff = ungrouped(decode(spec, enc), spec, Ws.shape[0], K) / s
        D = Ws - W_eff
        err = float(((D @ G).double() * D.double()).sum())
        if best is None or err < best[0]:
            best = (err, alpha, s, enc)
    err, alpha, s, enc = best
    if Ws is not W:
        enc = rtn_quantize(W * s, spec)
    if clip:
        Gs = G / s.unsqueeze(0) / s.unsqueeze(1)
        enc = rtn_quantize(W * s, spec, gram=Gs, clip=True, clip_grid=clip_grid, max_shrink=max_shrink)
    assert grouped(W, spec).shape == enc.codes.shape, "AWQ codes shape mismatch"
    return enc, s, {"alpha": alpha, "rel_error": err / den if den > 0 else 0.0}
