"""Simulated KV-cache quantization: Llama attention that attends to the cache as the runtime stores it.

`kv_quantized(model, kv)` is a context manager; inside it every attention module named in `kv`
({module: KVLayerSpec}, `ResolvedPlan.kv`) runs `kv_attention` instead of its own forward, restored on exit
(even on an exception). It is exact teacher-forced emulation of a decoder that writes one token at a time:

    for query t (0-based, t + 1 tokens written), key / value j <= t is read as
        its dequantized code   when j < spec.quantized_prefix(t + 1)      (workbench.quant.kvcache)
        its bf16 value         otherwise (the residual window and a per-channel group not yet full)

A token's codes never change once written (per-token scales come from the token, per-channel scales from
its aligned group of G tokens, which is complete when it is quantized), so one whole-sequence quantization
K̂, V̂ and a [T, T] "read as code" mask per side give every query exactly what the runtime would return.
Pre-RoPE keys (`_pre`) are quantized before the rotary embedding and rotated after dequantization; `_had`
keys are quantized in the Hadamard basis (k H) and rotated back (q . k̂ = (q H) . (k H)^ , the runtime's
rotated queries). Only `LlamaAttention` (transformers 4.56 .. 5.x) is patched; any other attention class
is refused naming the layer. Paper: KIVI https://arxiv.org/abs/2402.02750.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from workbench.errors import WorkbenchError
from workbench.model.inventory import get_module
from workbench.plan.kv import KVLayerSpec
from workbench.quant.kvcache import KVSpec, fake_quant_kv, hadamard_matrix

PATCHABLE = ("LlamaAttention",)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF Llama rotary embedding of x [B, H, T, D] by cos / sin [B, T, D] (rotate_half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def read_mask(spec: KVSpec | None, T: int, head_dim: int, device=None) -> torch.Tensor:
    """[T, T] bool: query t reads key j as its dequantized code (j < quantized_prefix(t + 1))."""
    if spec is None:
        return torch.zeros(T, T, dtype=torch.bool, device=device)
    q = torch.tensor([spec.quantized_prefix(t + 1, head_dim) for t in range(T)], device=device)
    return torch.arange(T, device=device)[None, :] < q[:, None]


def quantize_keys(k: torch.Tensor, spec: KVSpec, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Dequantized post-RoPE keys [B, H, T, D] from pre-RoPE keys k, as the runtime stores them."""
    x = k if spec.pre_rope else apply_rope(k, cos, sin)
    if spec.hadamard:
        H = hadamard_matrix(k.shape[-1]).to(k.device)
        x_hat = fake_quant_kv(x.float() @ H, spec) @ H.T
    else:
        x_hat = fake_quant_kv(x, spec)
    return apply_rope(x_hat, cos, sin) if spec.pre_rope else x_hat


def _mix(fp: torch.Tensor, q: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    return fp if q is None else torch.where(mask, q, fp)


def kv_attention(attn, spec: KVLayerSpec, hidden_states, position_embeddings=None, attention_mask=None, **kw):
    """LlamaAttention.forward with the quantized cache (module docstring); returns (output, None)."""
    if kw.get("cache") is not None or kw.get("past_key_values") is not None:
        raise WorkbenchError(
            f"layer {attn._wb_name}: the simulated KV cache runs teacher-forced passes only (use_cache=False)"
        )
    B, T, _ = hidden_states.shape
    D = attn.head_dim
    q = attn.q_proj(hidden_states).view(B, T, -1, D).transpose(1, 2).float()
    k = attn.k_proj(hidden_states).view(B, T, -1, D).transpose(1, 2).float()
    v = attn.v_proj(hidden_states).view(B, T, -1, D).transpose(1, 2).float()
    cos, sin = (t.float() for t in position_embeddings)
    k_hat = quantize_keys(k, spec.k, cos, sin) if spec.k is not None else None
    v_hat = fake_quant_kv(v, spec.v) if spec.v is not None else None
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = attn.num_key_value_groups
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    mk, mv = read_mask(spec.k, T, D, q.device), read_mask(spec.v, T, D, q.device)
    s = q @ k.transpose(-1, -2)
    if k_hat is not None:
        s = torch.where(mk, q @ k_hat.repeat_interleave(rep, 1).transpose(-1, -2), s)
    s = s * attn.scaling
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        m = attention_mask[..., :T, :T]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    s = s.masked_fill(~causal, float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = p @ v if v_hat is None else (p * ~mv) @ v + (p * mv) @ v_hat.repeat_interleave(rep, 1)
    out = out.transpose(1, 2).reshape(B, T, -1).to(hidden_states.dtype)
    return attn.o_proj(out), None


def check_patchable(model: torch.nn.Module, names) -> None:
    """Refuse, naming the first one, attention modules this simulation cannot patch."""
    for name in names:
        mod = get_module(model, name)
        if type(mod).__name__ not in PATCHABLE:
            raise WorkbenchError(
                f"layer {name}: {type(mod).__name__} attention cannot take a simulated KV cache "
                f"(supported: {', '.join(PATCHABLE)})"
            )


@contextlib.contextmanager
def kv_quantized(model: torch.nn.Module, kv: dict[str, KVLayerSpec]) -> Iterator[None]:
    """Run the model with the KV caches of `kv`'s attention modules simulated (forwards always restored)."""
    check_patchable(model, kv)
    patched = []
    try:
        for name, spec in kv.items():
            mod = get_module(model, name)
            mod._wb_name = name
            mod.forward = functools.partial(kv_attention, mod, spec)
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward
