"""SmoothQuant (https://arxiv.org/abs/2211.10438) folded into a Llama-family model, in place.

For the layers a `Smooth` transform selects, each input channel j gets
    s_j = max|X_j|^α / max|W_j|^(1-α)          (X: calibration inputs, W: every layer reading that input)
and W[:, j] <- W[:, j] * s_j while the operation that produced X divides its output channel j by s_j, so the
product is unchanged and activation outliers move into the weights (α = 0: none move, α = 1: all of them).
Where the division goes, by the role of the selected layer:
    q / k / v   the block's input_layernorm weight      (q, k and v share one s: they read one input)
    gate / up   the block's post_attention_layernorm     (shared s)
    down        up_proj's output rows (down's input is SiLU(gate) * up, linear in up)
    o           v_proj's output rows, per key/value head channel: attention mixes positions, never
                channels, so o's input channel (head h, dim d) is v's channel (kv head h // n_rep, dim d);
                the query heads sharing a kv head share its s
    lm_head     the final model.norm
A down_proj that already has an online Hadamard is refused (its input is rotated after up_proj).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.model.inventory import get_module, layer_inventory
from workbench.plan.transforms import Smooth
from workbench.transform.rotate import check_llama, untie_head

_EPS = 1e-5


@dataclass
class _Group:
    """Layers reading one input, and where their 1/s goes."""

    first: str  # name of the layer whose input is measured
    readers: list[torch.nn.Linear]
    prev: torch.nn.Module  # a norm (weight [K]) or a linear whose output rows are divided
    n_rep: int = 1  # o_proj: query heads per kv head; head_dim in `head_dim`
    head_dim: int = 0


def _groups(model: torch.nn.Module, names: list[str]) -> dict[str, _Group]:
    """One group per (block, input) the selected layers read; refuses roles with nowhere to fold."""
    by_name = {x.name: x for x in layer_inventory(model)}
    cfg = model.config
    out: dict[str, _Group] = {}
    for name in names:
        role = by_name[name].role
        if role == "lm_head":
            out[name] = _Group(name, [get_module(model, name)], model.model.norm)
            continue
        if role not in ("q", "k", "v", "o", "gate", "up", "down"):
            raise WorkbenchError(
                f"smooth: layer {name} (role {role}) has no operation before it to fold into"
            )
        blk = get_module(model, name.rsplit(".", 2)[0])
        a, m = blk.self_attn, blk.mlp
        base = name.rsplit(".", 2)[0]
        if role in ("q", "k", "v"):
            out[f"{base}.qkv"] = _Group(
                f"{base}.self_attn.q_proj", [a.q_proj, a.k_proj, a.v_proj], blk.input_layernorm
            )
        elif role in ("gate", "up"):
            out[f"{base}.gu"] = _Group(
                f"{base}.mlp.gate_proj", [m.gate_proj, m.up_proj], blk.post_attention_layernorm
            )
        elif role == "down":
            if hasattr(m.down_proj, "online_hadamard"):
                raise WorkbenchError(
                    f"smooth: layer {name} has an online Hadamard (its input is rotated after up_proj): put "
                    "the smooth transform before the hadamard 'down' one"
                )
            out[name] = _Group(name, [m.down_proj], m.up_proj)
        else:
            hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            n_rep = cfg.num_attention_heads // getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
            out[name] = _Group(name, [a.o_proj], a.v_proj, n_rep, hd)
    return out


@torch.no_grad()
def _input_absmax(model: torch.nn.Module, names: list[str], batches: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per input channel max |x| [K] (float64) of the named layers over calibration batches [n, L]."""
    amax: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).double()
            amax[name] = torch.maximum(amax[name], x) if name in amax else x

        return hook

    handles = [get_module(model, n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        device = next(model.parameters()).device
        for ids in batches:
            model(input_ids=ids[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: v.cpu() for n, v in amax.items()}


def _kv_index(K: int, n_rep: int, head_dim: int) -> torch.Tensor:
    """o_proj input channel c (query head h, dim d) -> v_proj output channel (h // n_rep, d): [K] long."""
    c = torch.arange(K)
    return (c // head_dim // n_rep) * head_dim + c % head_dim


def _apply(g: _Group, xmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Scale one group in place; returns s [K]."""
    # s is computed on the CPU (xmax comes from there) and moved to the weights' device to scale them
    wmax = torch.stack([r.weight.detach().abs().double().amax(0) for r in g.readers]).amax(0).cpu()
    if g.head_dim:  # o_proj: one s per v channel, shared by the query heads reading it
        idx = _kv_index(xmax.shape[0], g.n_rep, g.head_dim)
        n_kv = int(idx.max()) + 1
        xmax = torch.zeros(n_kv, dtype=torch.float64).scatter_reduce(0, idx, xmax, "amax")
        wmax = torch.zeros(n_kv, dtype=torch.float64).scatter_reduce(0, idx, wmax, "amax")
    s = (xmax.clamp_min(_EPS) ** alpha / wmax.clamp_min(_EPS) ** (1 - alpha)).clamp_min(_EPS)
    s_in = s[_kv_index(g.readers[0].in_features, g.n_rep, g.head_dim)] if g.head_dim else s
    s_in, s_out = s_in.to(g.readers[0].weight.device), s.to(g.prev.weight.device)
    for r in g.readers:
        r.weight.data = (r.weight.detach().double() * s_in[None, :]).to(r.weight.dtype)
    if isinstance(g.prev, torch.nn.Linear):  # divide the output rows of up_proj / v_proj
        g.prev.weight.data = (g.prev.weight.detach().double() / s_out[:, None]).to(g.prev.weight.dtype)
        if g.prev.bias is not None:
            g.prev.bias.data = (g.prev.bias.detach().double() / s_out).to(g.prev.bias.dtype)
    else:
        g.prev.weight.data = (g.prev.weight.detach().double() / s_out).to(g.prev.weight.dtype)
    return s


def smooth(model: torch.nn.Module, loaded, t: Smooth, progress: bool = False) -> dict[str, torch.Tensor]:
    """Apply SmoothQuant to the layers `t.match` selects (in place); returns {group's first layer: s}.

    Calibration: `t.calib_seqs` windows of 512 tokens (or the context) of `t.calib`, seed 0, measured on
    the model as it is now (after the transforms before this one).
    """
    from workbench.model.data import calibration_batches
    from workbench.plan.plan import match_layers

    check_llama(model, "smooth")
    names = match_layers(t.match, layer_inventory(model))
    if not names:
        raise WorkbenchError(f"smooth: match '{t.match}' selects no layer")
    groups = _groups(model, names)
    if any(g.prev is model.model.norm for g in groups.values()):
        untie_head(model)
    seq_len = min(512, loaded.description.max_context or 512)
    batches = calibration_batches(
        loaded.tokenizer, t.calib, t.calib_seqs, seq_len, 0, loaded.description.max_context
    )
    xmax = _input_absmax(model, [g.first for g in groups.values()], batches)
    return {g.first: _apply(g, xmax[g.first], float(t.alpha)) for g in groups.values()}
