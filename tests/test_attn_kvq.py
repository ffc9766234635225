"""The quantized-cache decode-attention kernel against its torch twin and the store (issue 17).

Without CUDA the Triton interpreter runs the kernel on the CPU on small shapes.
"""

from __future__ import annotations

import copy
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import pytest  # noqa: E402
from workbench.kernels.attn_kvq import attn_kvq  # noqa: E402
from workbench.kernels.reference import attn_kvq_ref  # noqa: E402

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.runtime.kvcache import QuantKVSide, decode_attention, kernel_args  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
CASES = [
    ("int4_ch_g16_r8", "int4_tok_r8", 45),
    ("int8_ch_g16", "int8_tok", 45),
    ("int4_ch_g16", "int4_tok_g8_sym", 16),
    ("int2_ch_g16_r4", "int2_tok_r4", 7),  # nothing quantized yet: the window only
    ("int8_ch_g16_r16", "int4_tok_g4", 64),
    ("int2_ch_g8", "int2_tok_g8", 40),  # int2 codes unpacked from whole bytes
]


def _filled(kspec, vspec, n, B=2, Hkv=2, D=16, cap=64):
    torch.manual_seed(n)
    k = QuantKVSide(kspec, B, Hkv, D, cap, DEV)
    v = QuantKVSide(vspec, B, Hkv, D, cap, DEV)
    x = torch.randn(B, Hkv, n, D, device=DEV) * torch.linspace(0.3, 4.0, D, device=DEV)  # outlier channels
    for t in range(n):  # written one token at a time, as a decoder does
        k.append(x[:, :, t : t + 1])
        v.append(torch.randn(B, Hkv, 1, D, device=DEV))
    return k, v


@pytest.mark.parametrize("kspec,vspec,n", CASES)
def test_kernel_matches_twin_and_store(kspec, vspec, n):
    k, v = _filled(kspec, vspec, n)
    q = torch.randn(2, 4, 16, device=DEV)
    got = attn_kvq(q, kernel_args(k), kernel_args(v), n, 0.25, block_n=16)
    ref = attn_kvq_ref(q, kernel_args(k), kernel_args(v), n, 0.25)
    K, V = (s.dequantized().repeat_interleave(2, 1) for s in (k, v))
    direct = (torch.softmax(q[:, :, None] @ K.transpose(-1, -2) * 0.25, -1) @ V)[:, :, 0]
    torch.testing.assert_close(ref, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decode_attention(q, k, v, 0.25), got if CUDA else ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hq,n_splits", [(2, 5), (8, 3), (16, None), (8, 1)])
def test_split_k_and_gqa_match_twin(hq, n_splits):
    """Forced splits (uneven last split, window straddling a split) and rep = Hq / Hkv of 1, 4, 8."""
    # 90 positions in blocks of 16 (the smallest tl.dot takes on a GPU): 6 blocks, the last one partial
    k, v = _filled("int4_ch_g16_r8", "int8_tok_r8", 90, cap=96)
    q = torch.randn(2, hq, 16, device=DEV)
    ka, va = kernel_args(k), kernel_args(v)
    got = attn_kvq(q, ka, va, 90, 0.25, block_n=16, n_splits=n_splits)
    ref = attn_kvq_ref(q, ka, va, 90, 0.25)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    one = attn_kvq(q, ka, va, 90, 0.25, block_n=16, n_splits=1)  # no combine across splits
    torch.testing.assert_close(got, one, atol=1e-5, rtol=1e-5)
    assert (got[:, 0] - got[:, -1]).abs().max() > 1e-2  # the query heads really differ


def test_kernel_refuses_fp8_and_mismatched_lengths():
    k, v = _filled("int4_ch_g16", "int4_tok", 20)
    with pytest.raises(ValueError, match="block_n 8 must be a power of two >= 16"):
        attn_kvq(torch.randn(2, 4, 16, device=DEV), kernel_args(k), kernel_args(v), 20, 0.25, block_n=8)
    with pytest.raises(WorkbenchError, match="reads int2/int4/int8 codes only"):
        kernel_args(QuantKVSide("fp8_e4m3_tok", 1, 1, 16, 16, DEV))
    v.append(torch.randn(2, 2, 1, 16, device=DEV))
    with pytest.raises(WorkbenchError, match="20 keys but 21 values"):
        decode_attention(torch.randn(2, 4, 16, device=DEV), k, v, 0.25)


@pytest.mark.parametrize("triton", [False, True])
def test_runtime_decode_equals_simulation_on_stories(stories, triton):
    """Token-by-token decode through the packed store (twin or kernel) == the teacher-forced simulation."""
    from workbench.measure.kvsim import kv_quantized
    from workbench.plan.plan import Plan
    from workbench.runtime.kvcache import kv_decode_logits

    model = stories.model
    ids = torch.randint(1, 500, (1, 20 if triton else 40))  # the interpreter is slow: 20 tokens
    if triton and CUDA:  # the compiled kernel reads CUDA tensors only (the interpreter takes CPU ones)
        with pytest.raises(WorkbenchError, match="needs CUDA tensors"):
            kv_decode_logits(model, ids[:, :2], Plan(k="int4_ch_g8_r4").resolve(model).kv, triton=True)
        model, ids = copy.deepcopy(model).cuda(), ids.cuda()
    kv = Plan(k="int4_ch_g8_r4", v="int4_tok_r4").resolve(model).kv
    with kv_quantized(model, kv):
        sim = model(input_ids=ids, use_cache=False).logits
    dec = kv_decode_logits(model, ids, kv, triton=triton)
    torch.testing.assert_close(dec, sim, atol=2e-4, rtol=1e-4)
    bf16 = model(input_ids=ids, use_cache=False).logits
    assert (dec - bf16).abs().max() > 1e-3  # the cache really is quantized
    with pytest.raises(WorkbenchError, match="layers.0.self_attn: the runtime cache stores post-RoPE keys"):
        kv_decode_logits(model, ids, Plan(k="int4_ch_pre").resolve(model).kv)
