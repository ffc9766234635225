"""Decode attention over the filled part of a static KV cache (split-K flash-decoding, one query token).

A static cache of L slots lets the whole decode step be one CUDA graph, but attention written with static
shapes (a mask over all L slots, as transformers' StaticCache path does) reads every slot at every step.
The kernel here reads the current length from device memory, so the same captured launch reads only the
filled slots (https://pytorch.org/blog/flash-decoding/):

* grid (kv heads, splits): program (h, s) owns slots [s * CHUNK, (s + 1) * CHUNK) of kv head h and all the
  G = Hq / Hkv query heads that share it (grouped-query attention, no repeated K/V); a program whose chunk
  starts past the length stores nothing and returns;
* per chunk an online softmax in fp32 over BLOCK_S keys at a time (query heads padded to 16 rows so the
  two products run on tensor cores), partial (max, sum, acc) written to a small fp32 scratch; the products
  take fp32 operands (TF32 on the GPU: exact for fp16 / bf16 keys and values, and the interpreter's bf16
  dot is wrong in Triton 3.9), the probabilities keep 10 mantissa bits instead of bf16's 7;
* a second kernel merges the filled splits of each query head into the output.

`decode_attention` is registered as the custom op `workbench::decode_attention` so that torch.compile
keeps it as one opaque call; on CPU (and for other dtypes) it runs `decode_attention_ref`.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency of the gpu extra
    triton = None

N_SM_TARGET = 132  # programs to fill an H100 / H200 at full cache (more splits when Hkv is small)
BLOCK_S = 32


def decode_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain-torch twin of `decode_attention` (fp32 softmax), static shapes (masks slots >= length).

    Args:
        q: [Hq, D] the query of the new token (rotary applied).
        k_cache, v_cache: [Hkv, L, D]; slots [0, length) hold the keys / values (the new token's included).
        length: int64 [1] on q's device, 1 <= length <= L.
        scale: softmax scale (1 / sqrt(D) for Llama).
    Returns:
        out: [Hq, D] in q.dtype.
    """
    Hq, D = q.shape
    Hkv, L, _ = k_cache.shape
    G = Hq // Hkv
    qg = q.float().view(Hkv, G, D)
    s = torch.einsum("hgd,hld->hgl", qg, k_cache.float()) * scale  # [Hkv, G, L]
    keep = torch.arange(L, device=q.device) < length  # [L]
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("hgl,hld->hgd", p, v_cache.float())
    return out.reshape(Hq, D).to(q.dtype)


def split_config(Hkv: int, L: int) -> tuple[int, int]:
    """(chunk, splits): slots per program and programs per kv head, so a full cache fills ~132 SMs."""
    want = max(1, math.ceil(N_SM_TARGET / Hkv))
    chunk = max(BLOCK_S, 1 << max(0, math.ceil(math.log2(max(1, math.ceil(L / want))))))
    return chunk, math.ceil(L / chunk)


if triton is not None:

    @triton.jit
    def _attn_partial_kernel(
        q_ptr,  # [Hq, D]
        k_ptr,  # [Hkv, L, D]
        v_ptr,  # [Hkv, L, D]
        len_ptr,  # int64 [1]
        m_ptr,  # fp32 [Hkv, SPLITS, GP]
        l_ptr,  # fp32 [Hkv, SPLITS, GP]
        acc_ptr,  # fp32 [Hkv, SPLITS, GP, D]
        scale_log2,  # softmax scale * log2(e)
        L,
        SPLITS,
        stride_kh,
        stride_kl,
        G: tl.constexpr,
        GP: tl.constexpr,
        D: tl.constexpr,
        CHUNK: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        h = tl.program_id(0)
        s = tl.program_id(1)
        length = tl.load(len_ptr).to(tl.int32)
        start = s * CHUNK
        if start < length:
            rg = tl.arange(0, GP)
            rd = tl.arange(0, D)
            gmask = rg < G
            qp = q_ptr + (h * G + rg)[:, None] * D + rd[None, :]
            q = tl.load(qp, mask=gmask[:, None], other=0.0).to(tl.float32)
            m = tl.full([GP], float("-inf"), tl.float32)
            lsum = tl.zeros([GP], tl.float32)
            acc = tl.zeros([GP, D], tl.float32)
            end = tl.minimum(start + CHUNK, length)
            for j in range(start, end, BLOCK_S):
                rs = j + tl.arange(0, BLOCK_S)
                smask = rs < end
                offs = h * stride_kh + rs[:, None] * stride_kl + rd[None, :]
                k = tl.load(k_ptr + offs, mask=smask[:, None], other=0.0).to(tl.float32)  # [BS, D]
                v = tl.load(v_ptr + offs, mask=smask[:, None], other=0.0).to(tl.float32)
                sc = tl.dot(q, tl.trans(k)) * scale_log2  # [GP, BS]
                sc = tl.where(smask[None, :], sc, float("-inf"))
                m_new = tl.maximum(m, tl.max(sc, axis=1))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(sc - m_new[:, None])
                lsum = lsum * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p, v)
                m = m_new
            base = (h * SPLITS + s) * GP + rg
            tl.store(m_ptr + base, m)
            tl.store(l_ptr + base, lsum)
            tl.store(acc_ptr + base[:, None] * D + rd[None, :], acc)

    @triton.jit
    def _attn_combine_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        len_ptr,
        out_ptr,  # [Hq, D]
        SPLITS,
        G: tl.constexpr,
        GP: tl.constexpr,
        D: tl.constexpr,
        CHUNK: tl.constexpr,
        SP: tl.constexpr,  # next power of two >= SPLITS
    ):
        hq = tl.program_id(0)
        h = hq // G
        g = hq % G
        length = tl.load(len_ptr).to(tl.int32)
        used = tl.cdiv(length, CHUNK)
        rs = tl.arange(0, SP)
        rd = tl.arange(0, D)
        smask = rs < used
        base = (h * SPLITS + rs) * GP + g  # [SP]
        m = tl.load(m_ptr + base, mask=smask, other=float("-inf"))
        lsum = tl.load(l_ptr + base, mask=smask, other=0.0)
        acc = tl.load(acc_ptr + base[:, None] * D + rd[None, :], mask=smask[:, None], other=0.0)
        mx = tl.max(m, axis=0)
        w = tl.where(smask, tl.exp2(m - mx), 0.0)  # [SP]
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
        tl.store(out_ptr + hq * D + rd, out.to(out_ptr.dtype.element_ty))


def _launch(q, k_cache, v_cache, length, scale):
    Hq, D = q.shape
    Hkv, L, _ = k_cache.shape
    G = Hq // Hkv
    GP = max(16, triton.next_power_of_2(G))
    chunk, splits = split_config(Hkv, L)
    dev = q.device
    m = torch.empty(Hkv, splits, GP, dtype=torch.float32, device=dev)
    lsum = torch.empty_like(m)
    acc = torch.empty(Hkv, splits, GP, D, dtype=torch.float32, device=dev)
    out = torch.empty_like(q)
    _attn_partial_kernel[(Hkv, splits)](
        q, k_cache, v_cache, length, m, lsum, acc, scale * 1.4426950408889634, L, splits,
        k_cache.stride(0), k_cache.stride(1),
        G=G, GP=GP, D=D, CHUNK=chunk, BLOCK_S=BLOCK_S, num_warps=4,
    )  # fmt: skip
    _attn_combine_kernel[(Hq,)](
        m, lsum, acc, length, out, splits,
        G=G, GP=GP, D=D, CHUNK=chunk, SP=triton.next_power_of_2(splits), num_warps=1,
    )  # fmt: skip
    return out


def kernel_reason(q: torch.Tensor, k_cache: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot run these inputs (the reference runs instead), or None."""
    if triton is None:
        return "triton is not installed"
    if not q.is_cuda:
        return "inputs are not on CUDA"
    if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype:
        return f"dtype {q.dtype} / cache {k_cache.dtype} (kernel: fp16 / bf16)"
    D = q.shape[-1]
    if D & (D - 1) or D < 16:
        return f"head dim {D} is not a power of two >= 16"
    if k_cache.stride(-1) != 1 or q.stride(-1) != 1 or not q.is_contiguous():
        return "q and the cache rows must be contiguous"
    return None


@torch.library.custom_op("workbench::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of one query token over slots [0, length) of the cache (shapes: decode_attention_ref)."""
    if kernel_reason(q, k_cache) is None:
        return _launch(q, k_cache, v_cache, length, scale)
    return decode_attention_ref(q, k_cache, v_cache, length, scale)


@decode_attention.register_fake
def _decode_attention_fake(q, k_cache, v_cache, length, scale):
    return torch.empty_like(q)
