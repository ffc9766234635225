"""Peer W4 kernels timed beside ours in ``bench_kernels.py``: torch's tinygemm and GemLite (if importable).

* tinygemm: ``torch.ops.aten._weight_int4pack_mm`` (bf16 activations: its CUDA kernel's dtype), the same
  random 4-bit codes, group 128, scales and zeros in its ``[K/G, N, 2]`` form.
* GemLite: ``gemlite.helper.A16Wn`` (fp16, 4 bits, group 128) from the same codes, scales and zeros; a
  pure-Python wheel (carry it, see the device README's ``.whl`` note).

Each returns None (with the reason printed) when the peer cannot run here; both are checked against the
fp32 reference before timing, like ours.
"""

from __future__ import annotations

import math

import torch


def _codes(N: int, K: int, G: int, gen: torch.Generator):
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, device="cuda", generator=gen)
    scales = torch.rand(N, K // G, device="cuda", generator=gen) * 0.01 + 1e-3
    zeros = torch.rand(N, K // G, device="cuda", generator=gen) * 15
    return codes, scales, zeros


def _ref(x: torch.Tensor, codes, scales, zeros, G: int) -> torch.Tensor:
    W = (codes.float() - zeros.repeat_interleave(G, 1)) * scales.repeat_interleave(G, 1)
    return x.float() @ W.t()


def _err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def _tinygemm_weights(codes, scales, zeros, G: int):
    """tinygemm form: packed nibbles (inner k tiles 8) and [K/G, N, 2] bf16 (scale, zero * scale offset)."""
    packed = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
    w = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
    # tinygemm dequantizes (q - 8) * scale + zero_point: zero_point = (8 - z) * scale
    sz = torch.stack([scales.t(), ((8 - zeros) * scales).t()], dim=2).to(torch.bfloat16).contiguous()
    return w, sz


def tinygemm_calls(K: int, N: int, M: int, n_copies: int, gen, log=print):
    """(calls cycling through n_copies weights, error vs reference) or None."""
    G = 128
    try:
        xs = [torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4)]
        wts = []
        for i in range(n_copies):
            codes, scales, zeros = _codes(N, K, G, gen)
            w, sz = _tinygemm_weights(codes, scales, zeros, G)
            if i == 0:
                y = torch.ops.aten._weight_int4pack_mm(xs[0], w, G, sz)
                err = _err(y, _ref(xs[0], codes, scales, zeros, G))
            wts.append((w, sz))
        op = torch.ops.aten._weight_int4pack_mm
        calls = [(lambda x=xs[i % 4], w=w, sz=sz: op(x, w, G, sz)) for i, (w, sz) in enumerate(wts)]
        return calls, err
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        log(f"  tinygemm: not run ({repr(e)[:160]})")
        return None


def gemlite_calls(K: int, N: int, M: int, n_copies: int, gen, log=print):
    """(calls, error) for GemLite W4 g128 fp16, or None when gemlite is not importable / fails."""
    G = 128
    try:
        from gemlite.helper import A16Wn
    except Exception as e:  # noqa: BLE001
        log(f"  gemlite: not importable ({repr(e)[:120]})")
        return None
    try:
        xs = [torch.randn(M, K, device="cuda", generator=gen).half() for _ in range(4)]
        layers = []
        for i in range(n_copies):
            codes, scales, zeros = _codes(N, K, G, gen)
            lin = A16Wn(device="cuda", dtype=torch.float16).from_weights(
                codes, scales.half(), zeros.half(), W_nbits=4, group_size=G
            )
            if i == 0:
                err = _err(lin(xs[0]), _ref(xs[0], codes, scales.half().float(), zeros.half().float(), G))
            layers.append(lin)
        calls = [(lambda x=xs[i % 4], f=f: f(x)) for i, f in enumerate(layers)]
        return calls, err
    except Exception as e:  # noqa: BLE001
        log(f"  gemlite: failed ({repr(e)[:160]})")
        return None


def n_copies_w4(N: int, K: int, l2_bytes: int) -> int:
    """Weight copies so that a graph cycle streams >= 3x L2 (as for our kernels)."""
    return max(2, math.ceil(3 * l2_bytes / (N * K // 2)))
