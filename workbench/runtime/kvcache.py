"""The quantized KV cache the runtime stores: packed codes, fp16 scales / minima, a high-precision window.

`QuantKVSide(spec, B, H, D, capacity)` holds one side (keys or values) of one attention layer for a batch:

    codes   uint8 [B, H, capacity, D * bits / 8]  (bits 2, 4, 8) token rows, element d of a token in byte
            d * bits // 8 at bit (d % (8 / bits)) * bits, LSB first; fp8_e4m3: the E4M3 bytes [.., D]
    scale   fp16  tok: [B, H, capacity, D / G]     ch: [B, H, capacity / G, D]
    lo      fp16  the per-row minimum (asymmetric int formats; absent when symmetric)
    window  the written tokens not yet quantized, in the dtype they were written in (bf16 on the GPU)

`append(x)` writes tokens x [B, H, n, D]; the tokens whose position falls below `spec.quantized_prefix`
(workbench.quant.kvcache: they left the R-token window, and for per-channel specs their aligned group of
G tokens is complete) are quantized then, once, with exactly the arithmetic of the simulation
(`int_params` / `int_codes`). `dequantized()` returns the [B, H, n, D] float32 cache a query reads:
what the CPU simulation (workbench/measure/kvsim.py) feeds every later query. `nbytes(n)` is
`KVSpec.cache_bytes` of the filled part (the window counted at 2 bytes per element).

The `_had` and `_pre` key options are the caller's business (it writes rotated / pre-RoPE keys); this
store only sees rows. Formats: int2, int4, int8 and fp8_e4m3 (int3/5/6/7 are simulation-only, refused).
"""

from __future__ import annotations

import functools
import os

import torch

from workbench.errors import WorkbenchError
from workbench.quant.kvcache import KVSpec, int_codes, int_dequant, int_params

STORABLE = ("int2", "int4", "int8", "fp8_e4m3")


def pack_kv_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [..., D] (values < 2^bits) into uint8 [..., D * bits / 8] (module docstring)."""
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for j in range(per):
        out |= c[..., j] << (j * bits)
    return out


def unpack_kv_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_kv_codes`: uint8 [..., D * bits / 8] -> codes uint8 [..., D]."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (j * bits)) & mask for j in range(per)]
    return torch.stack(parts, -1).reshape(*packed.shape[:-1], packed.shape[-1] * per)


class QuantKVSide:
    """One side (K or V) of one layer's quantized cache for a batch (module docstring)."""

    def __init__(self, spec: KVSpec | str, B: int, H: int, D: int, capacity: int, device="cpu"):
        spec = KVSpec.parse(spec)
        if spec.fmt not in STORABLE:
            raise WorkbenchError(f"KV-cache spec {spec}: the runtime stores {', '.join(STORABLE)} only")
        reason = spec.check(D, "k")
        if reason:
            raise WorkbenchError(f"KV-cache spec {spec}: {reason}")
        self.spec, self.B, self.H, self.D, self.capacity = spec, B, H, D, capacity
        self.G = spec.group(D)
        if spec.axis == "ch" and capacity % self.G:
            raise WorkbenchError(f"KV-cache spec {spec}: capacity {capacity} is not a multiple of {self.G}")
        bits = spec.bits
        width = D if spec.fmt == "fp8_e4m3" else D * bits // 8
        self.codes = torch.zeros(B, H, capacity, width, dtype=torch.uint8, device=device)
        srows = (capacity, D // self.G) if spec.axis == "tok" else (capacity // self.G, D)
        self.scale = torch.zeros(B, H, *srows, dtype=torch.float16, device=device)
        self.lo = None if spec.sym else torch.zeros_like(self.scale)
        self.window: torch.Tensor | None = None  # [B, H, n - n_quantized, D]
        self.n = 0
        self.n_quantized = 0

    # -------------------------------------------------------------- writing
    def append(self, x: torch.Tensor) -> None:
        """Write tokens x [B, H, n, D] at the end; quantize the ones that become due (module docstring)."""
        if self.n + x.shape[2] > self.capacity:
            raise WorkbenchError(f"KV cache full: {self.n} + {x.shape[2]} tokens > capacity {self.capacity}")
        self.window = x if self.window is None else torch.cat([self.window, x], 2)
        self.n += x.shape[2]
        due = self.spec.quantized_prefix(self.n, self.D)
        if due > self.n_quantized:
            k = due - self.n_quantized
            self._quantize(self.window[:, :, :k].float(), self.n_quantized)
            self.window = self.window[:, :, k:]
            self.n_quantized = due

    def _quantize(self, x: torch.Tensor, start: int) -> None:
        spec, T, G = self.spec, x.shape[2], self.G
        if spec.axis == "tok":
            rows = x.reshape(self.B, self.H, T, self.D // G, G)
        else:  # whole groups of G tokens, a row per channel
            rows = x.reshape(self.B, self.H, T // G, G, self.D).transpose(-1, -2)
        if spec.fmt == "fp8_e4m3":
            scale = (rows.abs().amax(-1, keepdim=True) / 448.0).clamp_min(2.0**-24).half().float()
            codes = (rows / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
            lo = None
        else:
            scale, lo = int_params(rows, spec.bits, spec.sym)
            codes = int_codes(rows, spec.bits, scale, lo)
        if spec.axis == "ch":
            codes = codes.transpose(-1, -2)
            s0, n_s = start // G, T // G
            self.scale[:, :, s0 : s0 + n_s] = scale.squeeze(-1).half()
            if lo is not None:
                self.lo[:, :, s0 : s0 + n_s] = lo.squeeze(-1).half()
        else:
            self.scale[:, :, start : start + T] = scale.squeeze(-1).half()
            if lo is not None:
                self.lo[:, :, start : start + T] = lo.squeeze(-1).half()
        codes = codes.reshape(self.B, self.H, T, self.D)
        if spec.fmt != "fp8_e4m3":
            codes = pack_kv_codes(codes, spec.bits)
        self.codes[:, :, start : start + T] = codes

    # -------------------------------------------------------------- reading
    def dequantized_prefix(self) -> torch.Tensor:
        """The quantized tokens' dequantized values [B, H, n_quantized, D] (float32)."""
        spec, q, G = self.spec, self.n_quantized, self.G
        if spec.fmt == "fp8_e4m3":
            vals = self.codes[:, :, :q].view(torch.float8_e4m3fn).float()
        else:
            vals = unpack_kv_codes(self.codes[:, :, :q], spec.bits).float()
        if spec.axis == "tok":
            rows = vals.reshape(self.B, self.H, q, self.D // G, G)
            scale = self.scale[:, :, :q, :, None].float()
            lo = None if self.lo is None else self.lo[:, :, :q, :, None].float()
        else:
            rows = vals.reshape(self.B, self.H, q // G, G, self.D)
            scale = self.scale[:, :, : q // G, None, :].float()
            lo = None if self.lo is None else self.lo[:, :, : q // G, None, :].float()
        out = rows * scale if spec.fmt == "fp8_e4m3" else int_dequant(rows, spec.bits, scale, lo)
        return out.reshape(self.B, self.H, q, self.D)

    def dequantized(self) -> torch.Tensor:
        """The whole cache [B, H, n, D] (float32) as a query reads it: dequantized codes, then the window."""
        parts = [self.dequantized_prefix()]
        if self.window is not None:
            parts.append(self.window.float())
        return torch.cat(parts, 2)

    def nbytes(self) -> int:
        """Bytes held for the n written tokens (codes, scales, minima, the window at 2 bytes per element)."""
        return self.spec.cache_bytes(self.n, self.D, self.B * self.H)


def kernel_args(side: QuantKVSide) -> dict:
    """One side as `attn_kvq` / `attn_kvq_ref` read it (workbench/kernels/attn_kvq.py)."""
    if side.spec.fmt == "fp8_e4m3":
        raise WorkbenchError(f"KV-cache spec {side.spec}: the decode kernel reads int2/int4/int8 codes only")
    return {
        "codes": side.codes,
        "scale": side.scale,
        "lo": side.lo,
        "window": None if side.window is None else side.window.contiguous(),
        "q": side.n_quantized,
        "bits": side.spec.bits,
        "per_channel": side.spec.axis == "ch",
        "group": side.G,
    }


def decode_attention(
    q: torch.Tensor, k: QuantKVSide, v: QuantKVSide, sm_scale: float, triton: bool | None = None
):
    """Attention of one query token per sequence q [B, Hq, D] over the quantized cache; float32 [B, Hq, D].

    triton None: the Triton kernel on CUDA, the torch twin (kernels/reference.py) elsewhere.
    """
    if k.n != v.n:
        raise WorkbenchError(f"KV cache: {k.n} keys but {v.n} values written")
    use = q.is_cuda if triton is None else triton
    if use and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise WorkbenchError(
            f"KV cache: the Triton decode kernel needs CUDA tensors (query on {q.device}); "
            "move the model to cuda or set TRITON_INTERPRET=1"
        )
    if use:
        from workbench.kernels.attn_kvq import attn_kvq as fn
    else:
        from workbench.kernels.reference import attn_kvq_ref as fn
    return fn(q, kernel_args(k), kernel_args(v), k.n, sm_scale)


def full_precision_side(capacity: int) -> KVSpec:
    """A side kept whole in high precision (its window of capacity + 1 tokens never empties): the bf16 side
    of a block whose other side has a spec (this store's and the fast decoder's static one)."""
    return KVSpec("int8", "tok", None, capacity + 1)


def _step_attention(attn, sides, triton, hidden_states, position_embeddings=None, attention_mask=None, **kw):
    """One decode step of a Llama attention (hidden_states [B, 1, dim]) through the quantized store."""
    from workbench.measure.kvsim import apply_rope

    B, T, _ = hidden_states.shape
    D = attn.head_dim
    q = attn.q_proj(hidden_states).view(B, T, -1, D).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(B, T, -1, D).transpose(1, 2)
    v = attn.v_proj(hidden_states).view(B, T, -1, D).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rope(q.float(), cos.float(), sin.float()), apply_rope(k.float(), cos.float(), sin.float())
    sides[0].append(k.to(hidden_states.dtype))
    sides[1].append(v)
    out = decode_attention(q[:, :, 0], sides[0], sides[1], attn.scaling, triton)
    return attn.o_proj(out.to(hidden_states.dtype).reshape(B, 1, -1)), None


@torch.no_grad()
def kv_decode_logits(model: torch.nn.Module, ids: torch.Tensor, kv: dict, triton: bool | None = None):
    """Logits [B, T, V] of a model fed ids [B, T] one token at a time through the quantized KV store.

    kv: {attention module: KVLayerSpec} (`ResolvedPlan.kv`); blocks or sides without a spec keep their
    cache in the model's dtype. Every Llama attention of the model is patched for the run (restored after);
    another attention class, and `_had` / `_pre` keys (simulation only for now), are refused naming the
    layer. Attention runs `decode_attention` (the Triton kernel on CUDA, its twin elsewhere).
    """
    from workbench.plan.kv import KVLayerSpec

    B, T = ids.shape
    attns = {n: m for n, m in model.named_modules() if n.endswith("self_attn")}
    cap = -(-T // 64) * 64
    patched = []
    try:
        for name, attn in attns.items():
            if type(attn).__name__ != "LlamaAttention":
                raise WorkbenchError(
                    f"layer {name}: {type(attn).__name__} attention cannot take the quantized cache"
                )
            spec = kv.get(name, KVLayerSpec())
            if spec.k is not None and (spec.k.hadamard or spec.k.pre_rope):
                raise WorkbenchError(
                    f"layer {name}: the runtime cache stores post-RoPE keys without _had ({spec.k})"
                )
            Hkv = attn.k_proj.out_features // attn.head_dim
            dev = ids.device
            sides = [
                QuantKVSide(s or full_precision_side(cap), B, Hkv, attn.head_dim, cap, dev)
                for s in (spec.k, spec.v)
            ]
            attn.forward = functools.partial(_step_attention, attn, sides, triton)
            patched.append(attn)
        out = []
        for t in range(T):
            pos = torch.full((B, 1), t, device=ids.device)
            out.append(model(input_ids=ids[:, t : t + 1], position_ids=pos, use_cache=False).logits)
        return torch.cat(out, 1)
    finally:
        for attn in patched:
            del attn.forward
