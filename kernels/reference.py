"""Plain-torch references for the dequantize-matmul kernels, with the launchers' exact signatures.

Every Triton launcher in this folder has a twin here that computes the same function in float32 on
any device (CPU included): unpack the codes (``workbench.quant.packing``), dequantize
``W_hat = (codes - zeros) * scales`` per group along K (shorter last group), ``y = x @ W_hat^T``, cast to
``x.dtype``.  They are the CPU fallback of the runtime and the ground truth of the tests.
"""

from __future__ import annotations

import torch

from workbench.quant.packing import n_groups, unpack_codes


def dequantize_int(
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
) -> torch.Tensor:
    """Packed int weight -> float32 W_hat [N, K].

    Args:
        packed: int32 [N, packed_words(K, bits)] (packing layout).
        scales_t: [n_groups, N] (``prepare_group_params``); zeros_t: same or None (symmetric).
        bits: 2, 3, 4 or 8; group_size: G (per-channel: G >= K); K: input features.
    """
    codes = unpack_codes(packed, bits, K).to(torch.float32)  # [N, K]
    ng = n_groups(K, group_size)
    G = min(group_size, K)
    idx = torch.arange(K, device=packed.device) // G  # group of each column
    assert int(idx.max()) == ng - 1, f"group count mismatch: {ng} vs {int(idx.max()) + 1}"
    s = scales_t.to(torch.float32).t()[:, idx]  # [N, K]
    if zeros_t is None:
        z = float(2 ** (bits - 1))
    else:
        z = zeros_t.to(torch.float32).t()[:, idx]
    return (codes - z) * s


def dequant_matmul_int_ref(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
) -> torch.Tensor:
    """y = x @ W_hat^T in float32, returned in x.dtype.  x: [M, K] fp16/bf16 -> y: [M, N]."""
    W = dequantize_int(packed, scales_t, zeros_t, bits, group_size, K)
    return (x.to(torch.float32) @ W.t()).to(x.dtype)


def dequantize_fp8(packed: torch.Tensor, scales: torch.Tensor, K: int) -> torch.Tensor:
    """Packed FP8 E4M3 patterns int32 [N, Kp/4] and fp32 scales [N] -> float32 W_hat [N, K]."""
    codes = unpack_codes(packed, 8, K)
    return codes.view(torch.float8_e4m3fn).to(torch.float32) * scales.to(torch.float32)[:, None]


def dequant_matmul_fp8_ref(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, K: int
) -> torch.Tensor:
    """y = x @ W_hat^T for FP8 E4M3 weights.  x: [M, K]; packed int32 [N, Kp/4]; scales fp32 [N] -> [M, N]."""
    W = dequantize_fp8(packed, scales, K)
    return (x.to(torch.float32) @ W.t()).to(x.dtype)


def gemv_int_partials_ref(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor | None,
    bits: int,
    group_size: int,
    K: int,
    plan: tuple[int, ...],
) -> torch.Tensor:
    """fp32 [split, M, N]: slice s = x[:, cols_s] @ W_hat[:, cols_s]^T over the columns split program s of
    ``plan`` covers (``split_partials.split_columns``); x: [M, K]."""
    from workbench.kernels.split_partials import split_columns

    W = dequantize_int(packed, scales_t, zeros_t, bits, group_size, K)
    return _partials(x, W, split_columns(plan, K, bits, group_size), plan[-1])


def gemv_fp8_partials_ref(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, K: int, plan: tuple[int, ...]
) -> torch.Tensor:
    """``gemv_int_partials_ref`` for FP8 E4M3 weights -> fp32 [split, M, N]."""
    from workbench.kernels.split_partials import split_columns

    return _partials(x, dequantize_fp8(packed, scales, K), split_columns(plan, K, 8, K), plan[-1])


def _partials(x: torch.Tensor, W: torch.Tensor, cols: int, split: int) -> torch.Tensor:
    xf = x.to(torch.float32)
    parts = [xf[:, s * cols : (s + 1) * cols] @ W[:, s * cols : (s + 1) * cols].t() for s in range(split)]
    return torch.stack(parts)


# Same function, one name per kernel launcher (gemv_int, gemm_int, gemv_fp8, gemm_fp8).
gemv_int_ref = dequant_matmul_int_ref
gemm_int_ref = dequant_matmul_int_ref
gemv_fp8_ref = dequant_matmul_fp8_ref
gemm_fp8_ref = dequant_matmul_fp8_ref


def _act_spec(fmt: str, clip: float) -> str:
    return f"{fmt}_tok{'_sym' if fmt == 'int8' else ''}{f'_clip{clip:g}' if clip != 1.0 else ''}"


def w8a8_int8_ref(
    x: torch.Tensor, w_q: torch.Tensor, s_w: torch.Tensor, clip: float = 1.0, use_int_mm: bool | None = None
) -> torch.Tensor:
    """Twin of ``gemm_w8a8.w8a8_int8``: the plan's simulated ``int8_tok_sym`` input (quant/act.py) times the
    dequantized weight, in float32.  x [M, K]; w_q int8 [N, K]; s_w fp32 [N] -> y [M, N] in x.dtype."""
    from workbench.quant.act import fake_quant_act

    x_hat = fake_quant_act(x.float(), _act_spec("int8", clip))
    return (x_hat @ (w_q.float() * s_w.float()[:, None]).t()).to(x.dtype)


def w8a8_fp8_ref(x: torch.Tensor, w_q: torch.Tensor, s_w: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """Twin of ``gemm_w8a8.w8a8_fp8``: the simulated ``fp8_e4m3_tok`` input times the dequantized E4M3
    weight, in float32.  x [M, K]; w_q float8_e4m3fn [N, K]; s_w fp32 [N] -> y [M, N] in x.dtype."""
    from workbench.quant.act import fake_quant_act

    x_hat = fake_quant_act(x.float(), _act_spec("fp8_e4m3", clip))
    return (x_hat @ (w_q.float() * s_w.float()[:, None]).t()).to(x.dtype)


def _kvq_side_values(side: dict, n: int, D: int) -> torch.Tensor:
    """float32 [B, Hkv, n, D] of one side of a quantized KV cache (``attn_kvq`` layout)."""
    bits, G, q = side["bits"], side["group"], side["q"]
    packed = side["codes"][:, :, :q]
    per = 8 // bits
    parts = [(packed >> (j * bits)) & ((1 << bits) - 1) for j in range(per)]
    codes = torch.stack(parts, -1).reshape(*packed.shape[:-1], D).float()
    if side["per_channel"]:
        idx = torch.arange(q, device=packed.device) // G
        scale = side["scale"].float()[:, :, idx]  # [B, H, q, D]
        lo = None if side["lo"] is None else side["lo"].float()[:, :, idx]
    else:
        idx = torch.arange(D, device=packed.device) // G
        scale = side["scale"].float()[:, :, :q][..., idx]
        lo = None if side["lo"] is None else side["lo"].float()[:, :, :q][..., idx]
    deq = (codes - 2 ** (bits - 1)) * scale if lo is None else codes * scale + lo
    w = side["window"]
    return deq if w is None else torch.cat([deq, w.float()], 2)[:, :, :n]


def attn_kvq_ref(
    q: torch.Tensor, k: dict, v: dict, n: int, sm_scale: float, block_n: int = 64
) -> torch.Tensor:
    """Twin of ``attn_kvq.attn_kvq``: softmax(q K^T * sm_scale) V over the dequantized cache, float32."""
    B, Hq, D = q.shape
    K, V = _kvq_side_values(k, n, D), _kvq_side_values(v, n, D)
    rep = Hq // K.shape[1]
    K, V = K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1)
    p = torch.softmax((q.float()[:, :, None, :] @ K.transpose(-1, -2)) * sm_scale, -1)
    return (p @ V)[:, :, 0]


def gptq_block_ref(
    W1: torch.Tensor, Hinv1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor, maxq: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of `gptq_block.gptq_block`: GPTQ's column loop over one block, the ops of quant/gptq.py.

    W1 [N, B], Hinv1 [B, B], S1 / Z1 [N, B] float32 -> codes uint8 [N, B], Err1 float32 [N, B].
    """
    N, B = W1.shape
    W1 = W1.clone()
    codes = torch.empty(N, B, dtype=torch.uint8, device=W1.device)
    err1 = torch.zeros_like(W1)
    for i in range(B):
        w, s, z = W1[:, i], S1[:, i], Z1[:, i]
        q = torch.clamp(torch.round(w / s) + z, 0, maxq)
        codes[:, i] = q.to(torch.uint8)
        err = (w - (q - z) * s) / Hinv1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        err1[:, i] = err
    return codes, err1
