"""Quantization error metrics: weight MSE, SQNR (dB), and the layer output error from a Gram matrix.

With calibration inputs X [T, K] of a linear layer y = x W^T and G = X^T X [K, K] (accumulated once, the
activations themselves are not kept), the relative output error of a quantized weight W_hat is

    ||X W^T - X W_hat^T||_F^2 / ||X W^T||_F^2  =  tr(D G D^T) / tr(W G W^T),   D = W - W_hat.
"""

from __future__ import annotations

import math

import torch


def weight_mse(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """Mean squared error between two [N, K] weights."""
    return float(((W.detach().double() - W_hat.detach().double()) ** 2).mean())


def sqnr_db(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum W^2 / sum (W - W_hat)^2) in dB (inf when exact)."""
    W = W.detach().double()
    noise = float(((W - W_hat.detach().double()) ** 2).sum())
    signal = float((W**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def quadratic_form(D: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per-row d_i G d_i^T for D [N, K], G [K, K] -> [N] float64 (float32 matmul, float64 sums)."""
    D, gram = D.detach().float(), gram.detach().float()
    return ((D @ gram).double() * D.double()).sum(-1)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error tr(D G D^T) / tr(W G W^T) on the calibration inputs summarised by `gram`.

    Args:
        W, W_hat: [N, K] reference and quantized (effective) weights.
        gram: [K, K] X^T X of the layer's calibration inputs.
    Returns:
        the relative squared output error (0 = exact; 1 = as large as the output itself).
    """
    assert W.shape == W_hat.shape and gram.shape == (W.shape[1], W.shape[1]), "shape mismatch"
    num = float(quadratic_form(W.float() - W_hat.float(), gram).sum())
    den = float(quadratic_form(W, gram).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def gram_from_inputs(X: torch.Tensor) -> torch.Tensor:
    """G = X^T X (float64 accumulation) for inputs X [..., K] -> [K, K] float32."""
    X = X.detach().reshape(-1, X.shape[-1]).double()
    return (X.T @ X).float()
