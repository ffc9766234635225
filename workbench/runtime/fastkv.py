"""Blocks of the fast decoder that keep their K/V cache quantized (`workbench.runtime.kvstatic`).

A block whose plan gives a key or value spec (`ResolvedPlan.kv`: attention module -> KVLayerSpec) stores
that side as codes + scales with a ring window of its R recent tokens (the other side, without a spec, stays
whole in its ring in the model dtype) and attends over the filled part with the Triton kernel
`attn_kvq_static` (length read on the device: the step stays one CUDA graph). Off CUDA (and without
TRITON_INTERPRET=1) the torch twin `StaticKVSide.values` is read instead.

Prefill attends the way the simulation does (workbench/measure/kvsim.py): query t reads key / value
j <= t as its dequantized code when j < quantized_prefix(t + 1), else the full-precision one, so a prompt
gives the logits a token-by-token decode through the store would.

Shapes: x [T, H], q [T, Hq, D], k / v [T, Hkv, D], cos / sin [T, 1, D] (as fastpath.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.measure.kvsim import read_mask
from workbench.quant.kvcache import KVSpec, fake_quant_kv
from workbench.runtime.kvcache import full_precision_side
from workbench.runtime.kvstatic import StaticKVSide, static_reason

PREFILL_ROWS = 256  # query rows per chunk of the masked prefill attention (memory: Hq x rows x T floats)
# The decode kernel's launch (`attn_kvq_static`): the fastest exact-enough setting of the bit-plane kernel
# inside a CUDA graph on the H200 at 4k and 32k, int8 and int4, 8B heads (2026-12-03, 96 settings:
# benchmarks/bench_kv_step_h200_planes_sweep2.json): BLOCK_N 64, 4 warps, no software pipelining, about
# PROGRAMS_PER_SM programs per SM over all kv heads (33 splits of each of 8 heads on 132 SMs).
LAUNCH = {"block_n": 64, "num_warps": 4, "num_stages": 1}
PROGRAMS_PER_SM = 2


def kernel_precision(dtype: torch.dtype) -> str:
    """The decode kernel's dot precision for a model of `dtype`: one tf32 pass (10-bit mantissas of q * scale,
    ~5e-4 relative) where the attention output is rounded to bf16 / fp16 anyway (8 / 11 bits); tf32x3
    (float32-accurate) for float32 models."""
    return "tf32" if dtype in (torch.bfloat16, torch.float16) else "tf32x3"


def kernel_splits(q: torch.Tensor, n_kv: int) -> int:
    """Programs per kv head: PROGRAMS_PER_SM per SM in all."""
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    return max(1, -(-PROGRAMS_PER_SM * sms // n_kv))


@dataclass(eq=False)
class KVBlockCache:
    """The two sides of one block's quantized cache and the specs they came from (None: model dtype)."""

    k: StaticKVSide
    v: StaticKVSide
    k_spec: KVSpec | None
    v_spec: KVSpec | None

    def allocated_bytes(self) -> int:
        return self.k.allocated_bytes() + self.v.allocated_bytes()


def kv_block_cache(name: str, spec, n_kv: int, head_dim: int, capacity: int, dtype, device) -> KVBlockCache:
    """The cache of block `name` for a KVLayerSpec (k / v KVSpec or None); refuses specs it cannot store."""
    for side in (spec.k, spec.v):
        reason = side is not None and static_reason(side, head_dim)
        if reason:
            raise WorkbenchError(f"layer {name}: KV-cache spec {reason} (the simulation still runs it)")
    for side in (spec.k, spec.v):  # one capacity for both sides (the kernel indexes both with it)
        if side is not None and side.axis == "ch":
            G = side.group(head_dim)
            capacity = -(-capacity // G) * G
    sides = [
        StaticKVSide(s or full_precision_side(capacity), n_kv, head_dim, capacity, dtype, device)
        for s in (spec.k, spec.v)
    ]
    return KVBlockCache(sides[0], sides[1], spec.k, spec.v)


def use_kernel(q: torch.Tensor) -> bool:
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def static_attention(q: torch.Tensor, c: KVBlockCache, length: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token q [Hq, D] over slots [0, length) of the quantized cache: float32 [Hq, D]."""
    Hq, D = q.shape
    if use_kernel(q):
        from workbench.kernels.attn_kvq import attn_kvq_static

        ka, va = c.k.kernel_args(), c.v.kernel_args()
        splits = kernel_splits(q, ka["codes"].shape[1])
        prec = kernel_precision(q.dtype)
        return attn_kvq_static(q[None], ka, va, length, scale, n_splits=splits, precision=prec, **LAUNCH)[0]
    K, V = c.k.values(length)[0], c.v.values(length)[0]  # [Hkv, cap, D]
    rep = Hq // K.shape[0]
    s = torch.einsum("hgd,hld->hgl", q.float().view(-1, rep, D), K) * scale
    keep = torch.arange(K.shape[1], device=q.device) < length
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    return torch.einsum("hgl,hld->hgd", p, V).reshape(Hq, D)


def prefill_attention(q, k, v, c: KVBlockCache, scale: float) -> torch.Tensor:
    """Causal attention of a prompt q [T, Hq, D] over k / v [T, Hkv, D] as the simulation reads the
    quantized cache (module docstring): float32 [T, Hq, D]."""
    T, Hq, D = q.shape
    rep = Hq // k.shape[1]
    kk, vv = (x.transpose(0, 1).float()[None] for x in (k, v))  # [1, Hkv, T, D]
    khat = fake_quant_kv(kk, c.k_spec)[0] if c.k_spec is not None else None
    vhat = fake_quant_kv(vv, c.v_spec)[0] if c.v_spec is not None else None
    mk, mv = read_mask(c.k_spec, T, D, q.device), read_mask(c.v_spec, T, D, q.device)
    kk, vv = kk[0].repeat_interleave(rep, 0), vv[0].repeat_interleave(rep, 0)  # [Hq, T, D]
    khat = khat.repeat_interleave(rep, 0) if khat is not None else None
    vhat = vhat.repeat_interleave(rep, 0) if vhat is not None else None
    qq = q.transpose(0, 1).float()  # [Hq, T, D]
    out = []
    for t0 in range(0, T, PREFILL_ROWS):
        t1 = min(T, t0 + PREFILL_ROWS)
        s = qq[:, t0:t1] @ kk.transpose(-1, -2)  # [Hq, rows, T]
        if khat is not None:
            s = torch.where(mk[t0:t1], qq[:, t0:t1] @ khat.transpose(-1, -2), s)
        causal = torch.arange(T, device=q.device)[None, :] <= torch.arange(t0, t1, device=q.device)[:, None]
        p = torch.softmax((s * scale).masked_fill(~causal, float("-inf")), -1)
        o = p @ vv if vhat is None else (p * ~mv[t0:t1]) @ vv + (p * mv[t0:t1]) @ vhat
        out.append(o)
    return torch.cat(out, 1).transpose(0, 1)  # [T, Hq, D]
