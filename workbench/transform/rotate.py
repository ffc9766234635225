"""Rotations of a Llama-family model, in place (`workbench.transform.apply.apply_transforms` runs them on a
copy).

Computational invariance (QuaRot, https://arxiv.org/abs/2404.00456; SliceGPT, https://arxiv.org/abs/2401.15024):
RMSNorm(x) = x / rms(x) * γ. With γ fused into the linears that read the norm (W <- W diag(γ), γ <- 1),
RMSNorm(x Q) = RMSNorm(x) Q for any orthogonal Q, because rms(x Q) = rms(x). So with the residual stream
rotated (embeddings E Q), every reader W <- W Q (q, k, v, gate, up, lm_head) and every writer W <- Qᵀ W,
b <- b Q (o_proj, down_proj) the logits are unchanged in exact arithmetic; in fp32 the difference is
rounding (`max_logit_change` measures it). The online Hadamard before down_proj is a forward pre-hook x <- x H
that reads the module's `online_hadamard` buffer [K, K], with W <- W H. SmoothQuant divides one operation's
output channels by s and multiplies the next layer's input columns by s (workbench.plan.transforms).

Supported: Llama-family decoders (model.model.layers[i] with self_attn.{q,k,v,o}_proj and
mlp.{gate,up,down}_proj nn.Linear, input_layernorm / post_attention_layernorm / model.model.norm plain
RMSNorms). Anything else (GPT-2 Conv1D, LayerNorm with a mean and a bias, extra norms) is refused
naming the layer and the reason.
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError
from workbench.model.inventory import layer_inventory
from workbench.quant.hadamard import random_hadamard

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = {"input_layernorm", "post_attention_layernorm"}


# ---------------------------------------------------------------------- structure checks
def check_llama(model: torch.nn.Module, what: str) -> list[torch.nn.Module]:
    """The decoder blocks of a Llama-family model, or a WorkbenchError naming the layer and the reason."""
    conv = next((x for x in layer_inventory(model) if x.kind == "conv1d"), None)
    if conv is not None:
        raise WorkbenchError(
            f"{what}: layer {conv.name} is a GPT-2 Conv1D; {what} needs a Llama-family model (RMSNorm and "
            "nn.Linear): a LayerNorm subtracts the mean and adds a bias, which a rotation cannot pass through"
        )
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    if blocks is None or not hasattr(inner, "norm") or not hasattr(inner, "embed_tokens"):
        raise WorkbenchError(
            f"{what}: {type(model).__name__} is not a Llama-family decoder (model.model.layers)"
        )
    for i, blk in enumerate(blocks):
        prefix = f"model.layers.{i}"
        for part, names in (("self_attn", _ATTN), ("mlp", _MLP)):
            for n in names:
                mod = getattr(getattr(blk, part, None), n, None)
                if type(mod) is not torch.nn.Linear:
                    raise WorkbenchError(
                        f"{what}: {prefix}.{part}.{n} is {type(mod).__name__}, not nn.Linear"
                    )
        extra = sorted(n for n, _ in blk.named_children() if "norm" in n and n not in _NORMS)
        if extra:
            raise WorkbenchError(f"{what}: {prefix}.{extra[0]} is a norm this transform cannot pass through")
        for n in sorted(_NORMS):
            _check_rmsnorm(getattr(blk, n, None), f"{prefix}.{n}", what)
    _check_rmsnorm(inner.norm, "model.norm", what)
    return list(blocks)


def _check_rmsnorm(norm, name: str, what: str) -> None:
    """Refuse a norm that is not y = x / rms(x) * weight (LayerNorm, Gemma's 1 + weight, a bias)."""
    w = getattr(norm, "weight", None)
    if w is None or w.dim() != 1 or getattr(norm, "bias", None) is not None:
        raise WorkbenchError(f"{what}: {name} ({type(norm).__name__}) is not an RMSNorm with a weight vector")
    x = torch.randn(4, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype) + 1.0
    with torch.no_grad():
        y = norm(x).float()
    xf, w = x.float(), w.detach()
    want = (
        xf
        * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + getattr(norm, "variance_epsilon", 1e-6))
        * w.float()
    )
    if not torch.allclose(y, want, rtol=1e-2, atol=1e-3 * float(want.abs().max())):
        raise WorkbenchError(
            f"{what}: {name} ({type(norm).__name__}) is not y = x / rms(x) * weight (a LayerNorm?)"
        )


# ------------------------------------------------------------------ weight edits (float64, then cast back)
def _set(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


def _fuse_norm(norm: torch.nn.Module, readers: list[torch.nn.Linear]) -> None:
    """W <- W diag(γ) for each linear reading the norm, then γ <- 1."""
    g = norm.weight.detach().double()
    for lin in readers:
        _set(lin.weight, lin.weight.detach().double() * g[None, :])
    _set(norm.weight, torch.ones_like(g))


def untie_head(model: torch.nn.Module) -> None:
    """Give lm_head its own weight (a rotated head no longer equals the rotated embeddings)."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False


def rotate_residual(model: torch.nn.Module, Q: torch.Tensor) -> None:
    """Fuse every RMSNorm into its readers, rotate the residual stream by orthogonal Q [D, D] (in place)."""
    blocks = check_llama(model, "hadamard (residual)")
    untie_head(model)
    head, inner = model.get_output_embeddings(), model.model
    Q = Q.to(head.weight.device, torch.float64)  # the edits run where the weights are (CPU or GPU)
    for blk in blocks:
        a, m = blk.self_attn, blk.mlp
        _fuse_norm(blk.input_layernorm, [a.q_proj, a.k_proj, a.v_proj])
        _fuse_norm(blk.post_attention_layernorm, [m.gate_proj, m.up_proj])
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            _set(lin.weight, lin.weight.detach().double() @ Q)
        for lin in (a.o_proj, m.down_proj):
            _set(lin.weight, Q.T @ lin.weight.detach().double())
            if lin.bias is not None:
                _set(lin.bias, lin.bias.detach().double() @ Q)
    _fuse_norm(inner.norm, [head])
    _set(head.weight, head.weight.detach().double() @ Q)
    emb = inner.embed_tokens
    _set(emb.weight, emb.weight.detach().double() @ Q)


def _online_rotate(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: x [..., K] -> x @ module.online_hadamard [K, K]."""
    x = args[0]
    return (x @ module.online_hadamard.to(x.dtype), *args[1:])


def online_hadamard_down(model: torch.nn.Module, seed: int) -> None:
    """An online random-signed Hadamard before every down_proj: x <- x H at run time, W <- W H (in place)."""
    blocks = check_llama(model, "hadamard (down)")
    for blk in blocks:
        lin = blk.mlp.down_proj
        if hasattr(lin, "online_hadamard"):
            raise WorkbenchError("hadamard (down): down_proj already has an online Hadamard (listed twice?)")
        H = random_hadamard(lin.in_features, seed).to(lin.weight.device)
        _set(lin.weight, lin.weight.detach().double() @ H)
        lin.register_buffer("online_hadamard", H.float())
        lin.register_forward_pre_hook(_online_rotate)


def carry_online_hadamard(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Give `dst` (the module replacing `src`, e.g. a QuantLinear) `src`'s online Hadamard, if it has one."""
    if hasattr(src, "online_hadamard") and not hasattr(dst, "online_hadamard"):
        dst.register_buffer("online_hadamard", src.online_hadamard.to(_device_of(dst)))
        dst.register_forward_pre_hook(_online_rotate)


def attach_online_hadamard(module: torch.nn.Module, K: int) -> None:
    """An empty [K, K] `online_hadamard` buffer and the pre-hook that applies it (a saved model's loader
    fills the buffer from its file)."""
    module.register_buffer("online_hadamard", torch.empty(K, K, device=_device_of(module)))
    module.register_forward_pre_hook(_online_rotate)


def _device_of(m: torch.nn.Module) -> torch.device:
    """The device of a module's first tensor (CPU when it has none)."""
    t = next(iter(list(m.parameters()) + list(m.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


@torch.no_grad()
def max_logit_change(original: torch.nn.Module, transformed: torch.nn.Module, ids: torch.Tensor) -> float:
    """max |logits(transformed) - logits(original)| over token ids [B, L] (the equivalence check; the ids
    are moved to each model's device)."""
    a = original(input_ids=ids.to(_device_of(original)), use_cache=False).logits.double()
    b = transformed(input_ids=ids.to(_device_of(transformed)), use_cache=False).logits.double()
    b = b.to(a.device)
    return float((a - b).abs().max())
