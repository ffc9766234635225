"""Quantization where the streamed block lives: the GPU for a 70B-shaped run, the CPU otherwise.

`quant.api.quantize_weight` computes on the CPU (exact, the reference). A streamed model on a GPU cannot
afford to copy 560 weights of up to 28672 x 8192 to the host and back, so on CUDA these helpers call the
same primitives on the device: `quant.gptq.gptq_quantize` (with quantize_weight's defaults: percdamp 0.01,
block 128, no act-order, no clipping), `runtime.apply.quantize_layer` (GPU RTN for the formats that encode
on the device) and `quant.metrics.quadratic_form` for the proxy cost tr(D G D^T) / tr(W G W^T)
(`sensitivity.proxy_costs`). On the CPU they are exactly the in-memory functions.
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError
from workbench.quant.spec import QuantSpec


def quantize_here(
    name: str, W: torch.Tensor, spec: QuantSpec, gram: torch.Tensor | None, *, device_gptq=None
):
    """QuantizedWeight of W [N, K]: GPTQ on W's device when it is CUDA (or `device_gptq=True`), else
    `runtime.apply.quantize_layer`."""
    from workbench.quant.api import QuantizedWeight
    from workbench.quant.gptq import gptq_quantize
    from workbench.runtime.apply import quantize_layer

    on_device = W.is_cuda if device_gptq is None else device_gptq
    if not (on_device and spec.algo == "gptq" and spec.is_int):
        return quantize_layer(name, W, spec, gram)
    N, K = W.shape
    reason = spec.check_layer(N, K)
    if reason:
        raise WorkbenchError(f"spec '{spec}' cannot apply to layer '{name}' [{N}, {K}]: {reason}")
    if gram is None or tuple(gram.shape) != (K, K):
        raise WorkbenchError(f"'{spec}' needs the [{K}, {K}] Gram of layer '{name}'")
    codes, scales, zeros, info = gptq_quantize(W.detach().float(), spec, gram.float())
    return QuantizedWeight(spec, codes, scales, zeros, info=info)


def fake_quant_here(
    name: str, W: torch.Tensor, spec: QuantSpec, gram: torch.Tensor | None, device_path: bool | None = None
) -> torch.Tensor:
    """W_hat [N, K] float32 on W's device (quant.api.fake_quant on the CPU). On CUDA, RTN of every format
    encodes and decodes on the device (`quant.rtn.rtn_quantize` + the registry's decode, as
    benchmarks/bench_sensitivity_gpu.py: a float8 cast may differ from the CPU's by one code, which a
    proxy cost does not see), GPTQ runs on the device, AWQ goes to the CPU. `device_path=True` takes that
    path on any device (tests run it on the CPU)."""
    from workbench.measure.simulate import needs_gram
    from workbench.quant.api import fake_quant
    from workbench.quant.formats import ungrouped
    from workbench.quant.registry import decode
    from workbench.quant.rtn import rtn_quantize

    g = gram if needs_gram(spec) else None
    on_device = W.is_cuda if device_path is None else device_path
    if not on_device or not spec.is_quantized or spec.algo == "awq":
        return fake_quant(W, spec, g, layer=name).to(W.device)
    if spec.algo == "gptq":
        return quantize_here(name, W, spec, g, device_gptq=True).dequantize().to(W.device, torch.float32)
    N, K = W.shape
    reason = spec.check_layer(N, K)
    if reason:
        raise WorkbenchError(f"spec '{spec}' cannot apply to layer '{name}' [{N}, {K}]: {reason}")
    return ungrouped(decode(spec, rtn_quantize(W.detach().float(), spec)), spec, N, K).float()


def proxy_costs_here(
    W: torch.Tensor,
    gram: torch.Tensor,
    specs: list[str],
    name: str = "",
    device_path: bool | None = None,
    exact: bool = False,
) -> dict[str, float]:
    """Relative output error tr(D G D^T) / tr(W G W^T) per spec: `sensitivity.proxy_costs` on the CPU, the
    same formula on W's device on CUDA (or with `device_path=True`; TF32 unless `exact`)."""
    from workbench.measure.sensitivity import proxy_costs

    if not (W.is_cuda if device_path is None else device_path):
        return proxy_costs(W, gram, specs, name=name)
    return dict(zip(specs, proxy_costs_tensor(W, gram, specs, name, exact).tolist()))


def proxy_costs_tensor(
    W: torch.Tensor, gram: torch.Tensor, specs: list[str], name: str = "", exact: bool = False
) -> torch.Tensor:
    """`proxy_costs_here`'s numbers as a float64 tensor [len(specs)] on W's device, with no host sync (a
    streamed scan reads a whole block's costs at once). On CUDA the quadratic forms D G D^T run in TF32
    (10-bit mantissa products, float32 accumulation; tests/test_streaming_tf32.py bounds the cost's
    relative difference to the float64 path), their row sums in float64; `exact=True`: float32."""
    from workbench.quant.metrics import quadratic_form

    W = W.detach().float()
    G = gram.float().to(W.device)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not exact
    try:
        den = quadratic_form(W, G).sum()
        nums = [
            quadratic_form(W - fake_quant_here(name, W, QuantSpec.parse(s), G, device_path=True), G).sum()
            for s in specs
        ]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    num = torch.stack(nums)
    zero_den = torch.where(num == 0, torch.zeros_like(num), torch.full_like(num, math.inf))
    return torch.where(den > 0, num / den, zero_den)


def gptq_stacked(names: list[str], Ws: list[torch.Tensor], spec: QuantSpec, gram: torch.Tensor) -> list:
    """GPTQ of layers that read one input (q/k/v, gate/up: one Gram) as one matrix of stacked rows.

    GPTQ's rows are independent given H = 2 X^T X (each row's error goes to its own later columns), so
    stacking [N1 + N2 + ..., K] runs the K sequential column steps and the inverse Cholesky once instead of
    once per layer. Returns one QuantizedWeight per layer, in order.
    """
    from workbench.quant.api import QuantizedWeight
    from workbench.quant.gptq import gptq_quantize

    K = Ws[0].shape[1]
    for name, W in zip(names, Ws):
        reason = spec.check_layer(W.shape[0], K)
        if reason or W.shape[1] != K:
            raise WorkbenchError(f"spec '{spec}' cannot apply to layer '{name}' {tuple(W.shape)}: {reason}")
    codes, scales, zeros, info = gptq_quantize(
        torch.cat([W.detach().float() for W in Ws]), spec, gram.float()
    )
    out, r0 = [], 0
    for W in Ws:
        r1 = r0 + W.shape[0]
        z = None if zeros is None else zeros[r0:r1]
        out.append(QuantizedWeight(spec, codes[r0:r1], scales[r0:r1], z, info={**info, "stacked": len(Ws)}))
        r0 = r1
    return out
