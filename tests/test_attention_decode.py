"""Split-K decode attention (workbench.runtime.attention) against its torch twin, and the step breakdown's
kernel categories.

Without CUDA the Triton interpreter runs the kernels on the CPU (``TRITON_INTERPRET=1`` is set before the
kernels are imported). Cache slots past the length are poisoned with NaN: a kernel that reads them fails.
"""

from __future__ import annotations

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of the kernels

import pytest  # noqa: E402

from workbench.runtime.attention import (  # noqa: E402
    _launch,
    decode_attention,
    decode_attention_ref,
    split_config,
)
from workbench.runtime.profile import _busy_us, kernel_category  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
# (Hq, Hkv, cache slots, head dim, filled length): GQA 1/2/4/8, lengths inside a split, across splits,
# a full cache and a single token
CASES = [
    (4, 2, 40, 16, 1),
    (8, 2, 200, 32, 77),
    (6, 6, 64, 16, 64),
    (12, 4, 300, 64, 300),
    (32, 4, 96, 32, 33),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kernel_matches_reference_and_reads_only_filled_slots(case, dtype):
    Hq, Hkv, L, D, n = case
    g = torch.Generator().manual_seed(L * D + n)
    q = torch.randn(Hq, D, generator=g).to(DEV, dtype)
    k = torch.randn(Hkv, L, D, generator=g).to(DEV, dtype)
    v = torch.randn(Hkv, L, D, generator=g).to(DEV, dtype)
    length = torch.tensor([n], device=DEV)
    ref = decode_attention_ref(q, k, v, length, D**-0.5)
    k[:, n:], v[:, n:] = float("nan"), float("nan")
    out = _launch(q, k, v, length, D**-0.5)
    assert out.shape == (Hq, D) and out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def test_reference_equals_full_softmax_over_prefix():
    torch.manual_seed(0)
    q, k, v = torch.randn(8, 16), torch.randn(2, 50, 16), torch.randn(2, 50, 16)
    out = decode_attention_ref(q, k, v, torch.tensor([20]), 0.25)
    kk, vv = k[:, :20].repeat_interleave(4, 0), v[:, :20].repeat_interleave(4, 0)  # [8, 20, 16]
    p = torch.softmax(torch.einsum("hd,hld->hl", q, kk) * 0.25, -1)
    torch.testing.assert_close(out, torch.einsum("hl,hld->hd", p, vv), rtol=1e-5, atol=1e-5)


def test_custom_op_falls_back_on_cpu_float32():
    torch.manual_seed(1)
    q, k, v = torch.randn(4, 16), torch.randn(2, 10, 16), torch.randn(2, 10, 16)
    ln = torch.tensor([7])
    assert torch.equal(decode_attention(q, k, v, ln, 0.25), decode_attention_ref(q, k, v, ln, 0.25))


def test_split_config_fills_the_gpu_and_covers_the_cache():
    for Hkv, L in [(8, 168), (8, 8192), (2, 4096), (32, 100)]:
        chunk, splits = split_config(Hkv, L)
        assert chunk * splits >= L > chunk * (splits - 1) and chunk & (chunk - 1) == 0
    assert 8 * split_config(8, 8192)[1] >= 128  # a long cache is spread over ~all SMs


@pytest.mark.parametrize(
    "name,cat",
    [
        ("_gemv_kernel", "linear"),
        ("_gemm_int_kernel", "linear"),
        ("nvjet_hsh_128x64_64x5_2x1_v_bz_coopB_TNN", "linear"),
        ("void gemv2T_kernel_val<int, int, __nv_bfloat16>", "linear"),
        ("_w4_mma_kernel", "linear"),
        ("_attn_partial_kernel", "attention"),
        ("pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits>", "attention"),
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norm_rotary"),
        ("triton_poi_fused_add_cat_mul_neg_slice_1", "norm_rotary"),
        ("triton_poi_fused_index_copy_2", "elementwise_copy"),
        ("triton_red_fused__to_copy_add_int_matmul_mean_mul_pow_rsqrt_0", "norm_rotary"),
        ("triton_poi_fused_int_matmul_mul_silu_split_with_sizes_6", "elementwise_copy"),
        ("triton_tem_fused_mm_0", "linear"),
        ("triton_poi_fused_add_cat_decode_attention_index_copy_mul_neg_split_1", "norm_rotary"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
            "elementwise_copy",
        ),
    ],
)
def test_kernel_categories(name, cat):
    assert kernel_category(name) == cat


def test_busy_time_is_the_union_of_intervals():
    assert _busy_us([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4
    assert _busy_us([]) == 0
