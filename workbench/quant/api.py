"""Public quantization entry points: quantize_weight -> QuantizedWeight, and fake_quant.

`QuantizedWeight` holds exactly what the runtime packs (see docs/ARCHITECTURE.md):
    codes        uint8 [N, K], original column order (GPTQ act-order uses static groups)
    scales       float32 [N, n_groups] (per channel [N, 1], per tensor [1, 1]); values exact in the storage
                 type of the spec (fp16 for int / fp4_e2m1 / nf4, fp32 for fp8, powers of two for mxfp4,
                 E4M3 values for nvfp4)
    zeros        float32 like scales (integer values, asymmetric int only) or None
    tensor_scale float32 scalar (nvfp4) or None
    input_scale  float32 [K] (AWQ) or None
Dequantization: integers W_q = (codes - zeros) * scales with zeros = 2^(b-1) when symmetric; float formats
W_q = value(code) * scales (* tensor_scale); groups run along K from column 0, the last one shorter.
`dequantize_codes()` returns W_q; `dequantize()` returns the effective weight W_q / input_scale, so that
    x @ dequantize()^T == (x / input_scale) @ dequantize_codes()^T.

High-precision specs (bf16, fp16) have nothing to quantize: `quantize_weight` raises WorkbenchError
(callers skip those layers, see `QuantSpec.is_quantized`), and `fake_quant` returns W rounded to that dtype
(as float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.errors import WorkbenchError
from workbench.quant.awq import awq_quantize
from workbench.quant.formats import Encoded, grouped, ungrouped
from workbench.quant.gptq import gptq_quantize
from workbench.quant.registry import decode, format_of
from workbench.quant.rtn import rtn_quantize
from workbench.quant.spec import QuantSpec


@dataclass
class QuantizedWeight:
    """Codes and metadata of one quantized [N, K] weight (layout: module docstring)."""

    spec: QuantSpec
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    tensor_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    info: dict = field(default_factory=dict)  # algorithm diagnostics (alpha, damp, seconds, ...)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize_codes(self) -> torch.Tensor:
        """W_q [N, K] float32 from codes and scales only (what the kernel multiplies by x / input_scale)."""
        N, K = self.codes.shape
        enc = Encoded(grouped(self.codes, self.spec), self.scales, self.zeros, self.tensor_scale)
        return ungrouped(decode(self.spec, enc), self.spec, N, K)

    def dequantize(self) -> torch.Tensor:
        """Effective weight [N, K] float32: W_q / input_scale (= W_q without AWQ)."""
        Wq = self.dequantize_codes()
        return Wq / self.input_scale.unsqueeze(0) if self.input_scale is not None else Wq

    def storage_bits(self) -> int:
        N, K = self.codes.shape
        return self.spec.storage_bits(N, K)


def _where(layer: str | None) -> str:
    return f"layer '{layer}'" if layer else "the weight"


def _check_inputs(W: torch.Tensor, spec: QuantSpec, gram: torch.Tensor | None, layer: str | None) -> None:
    where = _where(layer)
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise WorkbenchError(
            f"{where}: expected a 2-D float weight [out, in], got "
            f"{getattr(W, 'shape', type(W))} {getattr(W, 'dtype', '')}"
        )
    N, K = W.shape
    reason = spec.check_layer(N, K)
    if reason:
        raise WorkbenchError(f"spec '{spec}' cannot apply to {where} [{N}, {K}]: {reason}")
    if not torch.isfinite(W).all():
        n_bad = int((~torch.isfinite(W)).sum())
        raise WorkbenchError(f"NaN or inf in the weights of {where} ({n_bad} of {N * K} values)")
    if gram is not None:
        if tuple(gram.shape) != (K, K):
            raise WorkbenchError(f"{where}: Gram matrix has shape {tuple(gram.shape)}, expected [{K}, {K}]")
        if not torch.isfinite(gram).all():
            raise WorkbenchError(f"NaN or inf in the calibration inputs (Gram matrix) of {where}")


def quantize_weight(
    W: torch.Tensor,
    spec: str | QuantSpec,
    gram: torch.Tensor | None = None,
    *,
    layer: str | None = None,
    clip: bool = False,
    clip_grid: int = 20,
    max_shrink: float = 0.5,
    act_order: bool = False,
    percdamp: float = 0.01,
    blocksize: int = 128,
    awq_grid: int = 20,
    act_scale: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> QuantizedWeight:
    """Quantize one weight with a spec's format, granularity and algorithm.

    Args:
        W: [N, K] weight, any float dtype (computed in float32 on `device`).
        spec: QuantSpec or spec string, e.g. "int4_g128:gptq".
        gram: [K, K] X^T X of the layer's calibration inputs; required by gptq / awq, optional for rtn
            (used by the clipping search when clip=True).
        layer: layer name put in error messages.
        clip, clip_grid, max_shrink: range shrink search (rtn.py documents the criterion).
        act_order, percdamp, blocksize: GPTQ options (gptq.py).
        awq_grid, act_scale: AWQ options (awq.py): number of alpha steps, optional mean |x| per channel [K].
        device: where the quantization computes and the result lives: "cpu" (the reference) or a GPU
            (`measure.simulate` runs GPTQ there for a model on CUDA; float32 rounding may differ slightly).
    Returns:
        QuantizedWeight (layout in the module docstring), its tensors on `device`.
    Raises:
        WorkbenchError: bad spec, spec that keeps the layer in high precision, spec that cannot apply to
            the shape, NaN/inf in W or gram, missing gram for gptq/awq.
    """
    spec = QuantSpec.parse(spec)
    where = _where(layer)
    if not spec.is_quantized:
        raise WorkbenchError(
            f"spec '{spec}' keeps {where} in high precision: nothing to quantize "
            f"(skip the layer, or use fake_quant to round it to {spec.fmt})"
        )
    _check_inputs(W, spec, gram, layer)
    if spec.algo in ("gptq", "awq") and gram is None:
        raise WorkbenchError(f"'{spec}' needs calibration statistics (gram = X^T X) for {where}")
    N, K = W.shape
    W = W.detach().to(device, torch.float32)
    gram = gram.detach().to(device, torch.float32) if gram is not None else None

    if spec.algo == "gptq":
        codes, scales, zeros, info = gptq_quantize(
            W,
            spec,
            gram,
            percdamp=percdamp,
            blocksize=blocksize,
            act_order=act_order,
            clip=clip,
            clip_grid=clip_grid,
            max_shrink=max_shrink,
        )
        return QuantizedWeight(spec, codes, scales, zeros, info=info)
    input_scale = None
    info: dict = {}
    if spec.algo == "awq":
        enc, input_scale, info = awq_quantize(
            W,
            spec,
            gram,
            grid=awq_grid,
            act_scale=act_scale,
            clip=clip,
            clip_grid=clip_grid,
            max_shrink=max_shrink,
        )
    else:
        enc = rtn_quantize(W, spec, gram=gram, clip=clip, clip_grid=clip_grid, max_shrink=max_shrink)
    codes = ungrouped(enc.codes, spec, N, K)
    return QuantizedWeight(
        spec, codes.contiguous(), enc.scales, enc.zeros, enc.tensor_scale, input_scale, info
    )


def fake_quant(
    W: torch.Tensor, spec: str | QuantSpec, gram: torch.Tensor | None = None, **opts
) -> torch.Tensor:
    """dequantize(quantize_weight(W, spec, gram, **opts)) as float32 [N, K].

    For bf16 / fp16 specs: W rounded to that dtype, returned as float32.
    """
    spec = QuantSpec.parse(spec)
    if not spec.is_quantized:
        _check_inputs(W, spec, None, opts.get("layer"))
        return W.detach().to(format_of(spec).dtype).float()
    return quantize_weight(W, spec, gram, **opts).dequantize()
