"""A small decode path for Llama-family models (gpt-fast style), checked against the Hugging Face model.

The transformers model stays the reference; this path reads the same tensors (nn.Linear weights or the
packed QuantLinear buffers) and runs the same math with less around it:

* q/k/v and gate/up as one matmul per block where their specs agree (`workbench.runtime.fuse`);
* its own static K/V cache, one [Hkv, L, D] tensor pair per block, written at the position held on the
  device, and decode attention over the filled slots only (`workbench.runtime.attention`, split-K);
* rotary from a cos/sin table built once by the model's own rotary module (so rope scaling is the model's);
* norms, rotary, SiLU*up and the residual adds as plain torch ops that `mode="compile"` fuses: the block
  function is compiled once per distinct block layout (a uniform plan compiles one block, not 32), then
  the whole step (embedding -> blocks -> head -> argmax) is captured in one CUDA graph, no host work;
* prefill runs the whole prompt through the same blocks (M = T rows: the tensor-core GEMM path) with
  causal SDPA, and applies lm_head to the last position only.

Shapes: x [T, H] hidden states (batch 1), q [T, Hq, D], k / v [T, Hkv, D], cos / sin [T, 1, D].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.runtime.attention import decode_attention
from workbench.runtime.fastkv import KVBlockCache, kv_block_cache, prefill_attention, static_attention
from workbench.runtime.fuse import FUSE_GROUPS, LinearOp, group_ops, linear
from workbench.runtime.graph import GraphDecoder, model_dtype

MODEL_TYPES = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "llama3", "linear")


@dataclass(frozen=True)
class Shape:
    """Attention / MLP sizes of the model (constants of the compiled block)."""

    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    scale: float


@dataclass(eq=False)
class BlockOps:
    """One decoder block as tensors: norm weights and the (fused where possible) linears."""

    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: list[LinearOp]
    o: LinearOp
    gate_up: list[LinearOp]
    down: LinearOp


def fast_path_reason(model) -> str | None:
    """Why the fast path cannot run `model` (use the HF StaticDecoder), or None."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in MODEL_TYPES:
        return f"model type '{mt}' (fast path: {', '.join(MODEL_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation '{cfg.hidden_act}' (fast path: silu)"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "no model.layers / lm_head"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", mt == "mistral"):
        return "sliding-window attention"
    rope = getattr(getattr(inner, "rotary_emb", None), "rope_type", None)
    if rope not in STATIC_ROPE:
        return f"rope type '{rope}' (fast path: {', '.join(STATIC_ROPE)})"
    return None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: fp32 statistics, cast back, then the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated with cos / sin [T, 1, D] (HF rotate_half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def project(ops: list[LinearOp], x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of a fuse group (q, k, v or gate, up) for x [T, K], whether fused or not."""
    if len(ops) == 1:
        return list(linear(ops[0], x).split(ops[0].splits, dim=-1))
    return [linear(op, x) for op in ops]


def _attn_in(b: BlockOps, x: torch.Tensor, cos, sin, s: Shape):
    """Norm, q/k/v and rotary: x [T, H] -> q [T, Hq, D], k / v [T, Hkv, D]."""
    T = x.shape[0]
    q, k, v = project(b.qkv, rms_norm(x, b.ln1, s.eps))
    q = rope(q.view(T, s.n_heads, s.head_dim), cos, sin)
    k = rope(k.view(T, s.n_kv, s.head_dim), cos, sin)
    return q, k, v.view(T, s.n_kv, s.head_dim)


def _mlp_out(b: BlockOps, x: torch.Tensor, attn: torch.Tensor, s: Shape) -> torch.Tensor:
    """o_proj + residual, norm, SiLU(gate) * up, down + residual: [T, H]."""
    x = x + linear(b.o, attn)
    g, u = project(b.gate_up, rms_norm(x, b.ln2, s.eps))
    return x + linear(b.down, F.silu(g) * u)


def block_decode(x, pos, length, cos, sin, kc, vc, b: BlockOps, s: Shape) -> torch.Tensor:
    """One block for the token at `pos` [1], length = pos + 1: x [1, H]; writes kc / vc [Hkv, L, D] at pos."""
    q, k, v = _attn_in(b, x, cos, sin, s)
    kc.index_copy_(1, pos, k.transpose(0, 1))
    vc.index_copy_(1, pos, v.transpose(0, 1))
    a = decode_attention(q.view(s.n_heads, s.head_dim), kc, vc, length, s.scale)  # [Hq, D]
    return _mlp_out(b, x, a.view(1, s.n_heads * s.head_dim), s)


def block_prefill(x, cos, sin, kc, vc, b: BlockOps, s: Shape) -> torch.Tensor:
    """One block over a prompt at positions 0..T-1: x [T, H]; the cache's first T slots are written."""
    T = x.shape[0]
    q, k, v = _attn_in(b, x, cos, sin, s)
    kc[:, :T].copy_(k.transpose(0, 1))
    vc[:, :T].copy_(v.transpose(0, 1))
    rep = s.n_heads // s.n_kv
    kk = k.transpose(0, 1).repeat_interleave(rep, dim=0)  # [Hq, T, D]
    vv = v.transpose(0, 1).repeat_interleave(rep, dim=0)
    a = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], kk[None], vv[None], is_causal=True, scale=s.scale
    )
    return _mlp_out(b, x, a[0].transpose(0, 1).reshape(T, s.n_heads * s.head_dim), s)


def block_decode_kvq(x, pos, length, cos, sin, c: KVBlockCache, b: BlockOps, s: Shape) -> torch.Tensor:
    """`block_decode` over a quantized cache (workbench.runtime.fastkv): the token is stored at pos."""
    q, k, v = _attn_in(b, x, cos, sin, s)
    c.k.write(k[0], pos)
    c.v.write(v[0], pos)
    a = static_attention(q.view(s.n_heads, s.head_dim), c, length, s.scale)  # [Hq, D] float32
    return _mlp_out(b, x, a.to(x.dtype).view(1, s.n_heads * s.head_dim), s)


def block_prefill_kvq(x, cos, sin, c: KVBlockCache, b: BlockOps, s: Shape) -> torch.Tensor:
    """`block_prefill` over a quantized cache: stores the prompt, attends as the simulation reads it."""
    T = x.shape[0]
    q, k, v = _attn_in(b, x, cos, sin, s)
    c.k.fill(k.transpose(0, 1))
    c.v.fill(v.transpose(0, 1))
    a = prefill_attention(q, k, v, c, s.scale)  # [T, Hq, D] float32
    return _mlp_out(b, x, a.to(x.dtype).reshape(T, s.n_heads * s.head_dim), s)


class FastModel:
    """The tensors of a Llama-family CausalLM arranged for the fast path (fused copies of q/k/v, gate/up).

    unfused: one line per fuse group left as separate matmuls, with the reason.
    """

    def __init__(self, model):
        reason = fast_path_reason(model)
        if reason:
            raise WorkbenchError(f"the fast decode path cannot run this model: {reason}")
        cfg, inner = model.config, model.model
        self.model = model
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        attn0 = inner.layers[0].self_attn
        self.shape = Shape(
            cfg.num_attention_heads, cfg.num_key_value_heads, hd, float(cfg.rms_norm_eps),
            float(getattr(attn0, "scaling", hd**-0.5)),
        )  # fmt: skip
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.head = group_ops(model, ("lm_head",), "")[0][0]
        self.blocks: list[BlockOps] = []
        self.unfused: list[str] = []
        for i, layer in enumerate(inner.layers):
            qkv, r1 = group_ops(layer.self_attn, FUSE_GROUPS[0], f"model.layers.{i}.self_attn.")
            gu, r2 = group_ops(layer.mlp, FUSE_GROUPS[1], f"model.layers.{i}.mlp.")
            self.unfused += [r for r in (r1, r2) if r]
            o = group_ops(layer.self_attn, ("o_proj",), "")[0][0]
            down = group_ops(layer.mlp, ("down_proj",), "")[0][0]
            w1, w2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            self.blocks.append(BlockOps(w1, w2, qkv, o, gu, down))
        self.dtype = model_dtype(model)
        self.device = self.embed.device

    def rotary_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, 1, D] from the model's own rotary module (its rope scaling included)."""
        pos = torch.arange(length, device=self.device)[None]
        dummy = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.model.model.rotary_emb(dummy, pos)
        return cos[0][:, None, :].contiguous(), sin[0][:, None, :].contiguous()

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> logits [T, V] (final norm, lm_head)."""
        return linear(self.head, rms_norm(x, self.norm, self.shape.eps))

    def bytes_per_step(self) -> int:
        """Bytes of weights one decode step reads (every linear op, norms; not the embedding row)."""
        ops = [self.head] + [op for b in self.blocks for op in (*b.qkv, b.o, *b.gate_up, b.down)]
        norms = sum(2 * b.ln1.numel() * b.ln1.element_size() for b in self.blocks)
        return sum(op.nbytes() for op in ops) + norms


def _block_index(name: str, n_blocks: int) -> int:
    """Block index of an attention module name ('model.layers.3.self_attn' -> 3), checked."""
    parts = name.split(".")
    if len(parts) < 3 or parts[-1] != "self_attn" or not parts[-2].isdigit() or int(parts[-2]) >= n_blocks:
        raise WorkbenchError(f"KV-cache spec for '{name}': not an attention block of this model")
    return int(parts[-2])


class FastDecoder(GraphDecoder):
    """Greedy decoding on `FastModel` with the same buffers, modes and results as StaticDecoder.

    Args:
        model: a Llama-family transformers CausalLM (optionally after apply_plan), or a FastModel.
        max_cache_len: prompt + new tokens must fit.
        mode: "auto" (graph on CUDA, eager on CPU), "eager", "graph" or "compile".
        kv: {attention module ("model.layers.3.self_attn"): KVLayerSpec} (`ResolvedPlan.kv`): those blocks
            keep their cache quantized (workbench.runtime.fastkv); in mode "compile" they run uncompiled.
    """

    path = "fast"

    def __init__(self, model, max_cache_len: int = 512, mode: str = "auto", kv: dict | None = None):
        self.fm = model if isinstance(model, FastModel) else FastModel(model)
        fm, s = self.fm, self.fm.shape
        self._setup(fm.device, mode, max_cache_len)
        L = self.max_cache_len
        kw = dict(dtype=fm.dtype, device=fm.device)
        self.kvq: list[KVBlockCache | None] = [None] * len(fm.blocks)
        for name, spec in (kv or {}).items():
            i = _block_index(name, len(fm.blocks))
            if spec.k is not None or spec.v is not None:
                self.kvq[i] = kv_block_cache(name, spec, s.n_kv, s.head_dim, L, fm.dtype, fm.device)
        empty = torch.zeros(0, **kw)
        self.k = [empty if c else torch.zeros(s.n_kv, L, s.head_dim, **kw) for c in self.kvq]  # [Hkv, L, D]
        self.v = [empty if c else torch.zeros(s.n_kv, L, s.head_dim, **kw) for c in self.kvq]
        self.cos, self.sin = fm.rotary_table(L)  # [L, 1, D]
        self._block = block_decode
        self.notes = [f"not fused: {r}" for r in fm.unfused]
        n_q = sum(c is not None for c in self.kvq)
        if n_q:
            self.notes.append(f"quantized KV cache in {n_q} of {len(fm.blocks)} blocks")

    def cache_bytes(self) -> int:
        """Bytes the K/V cache holds on the device (all blocks; quantized ones: codes, scales, rings)."""
        bf = sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
        return bf + sum(c.allocated_bytes() for c in self.kvq if c is not None)

    def _compile(self) -> None:
        """Compile the block function (once per distinct block layout); the step is captured around it."""
        self._block = torch.compile(block_decode, fullgraph=False, dynamic=False)

    def _forward_step(self) -> torch.Tensor:
        fm = self.fm
        x = F.embedding(self.tok.view(1), fm.embed)  # [1, H]
        cos, sin = self.cos.index_select(0, self.pos), self.sin.index_select(0, self.pos)  # [1, 1, D]
        length = self.pos + 1  # once per step, not one tiny kernel per block
        for b, kc, vc, c in zip(fm.blocks, self.k, self.v, self.kvq):
            if c is None:
                x = self._block(x, self.pos, length, cos, sin, kc, vc, b, fm.shape)
            else:
                x = block_decode_kvq(x, self.pos, length, cos, sin, c, b, fm.shape)
        return fm.head_logits(x)  # [1, V]

    def _prefill_logits(self, ids: torch.Tensor) -> torch.Tensor:
        fm = self.fm
        x = F.embedding(ids[0], fm.embed)  # [T, H]
        return fm.head_logits(self._prefill_blocks(x)[-1:])  # [1, V]

    def _prefill_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """All blocks over a prompt x [T, H] at positions 0..T-1 (each cache's first T slots written)."""
        fm, T = self.fm, x.shape[0]
        cos, sin = self.cos[:T], self.sin[:T]
        for b, kc, vc, c in zip(fm.blocks, self.k, self.v, self.kvq):
            if c is None:
                x = block_prefill(x, cos, sin, kc, vc, b, fm.shape)
            else:
                x = block_prefill_kvq(x, cos, sin, c, b, fm.shape)
        return x

    def _reset_cache(self) -> None:
        pass  # slots past the position are never read: prefill rewrites 0..T-1, decode writes before reading

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [T, V] of a whole sequence ids [T] (prefill math, every position): for checks."""
        x = F.embedding(ids.to(self.device).reshape(-1), self.fm.embed)
        return self.fm.head_logits(self._prefill_blocks(x))
