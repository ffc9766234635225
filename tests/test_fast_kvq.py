"""The fast decoder's quantized KV cache (issue 17): the static store, the device-length kernel, the decoder.

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
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from workbench.kernels.attn_kvq import attn_kvq_static  # noqa: E402
from workbench.kernels.attn_kvq_common import head_base  # noqa: E402

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.runtime.kvcache import QuantKVSide  # noqa: E402
from workbench.runtime.kvstatic import StaticKVSide  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
SPECS = ["int4_ch_g16_r8", "int8_ch_g16", "int4_tok_r8", "int2_tok_g8", "int8_tok_g4_sym", "int4_ch_g8_r3"]


def _rows(n: int, H: int = 2, D: int = 16, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(n + seed)
    return (torch.randn(H, n, D, device=DEV) * torch.linspace(0.3, 4.0, D, device=DEV)).bfloat16()


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n_prompt,fused", [(0, True), (13, True), (13, False)])
def test_static_store_equals_quantkv_side(spec, n_prompt, fused):
    """Prompt fill + token writes at device positions (fused kernel / torch twin) == QuantKVSide.append
    token by token, bit-exact."""
    n, cap = 45, 64
    x = _rows(n)
    st = StaticKVSide(spec, 2, 16, cap, torch.bfloat16, DEV)
    ref = QuantKVSide(spec, 1, 2, 16, cap, DEV)
    if n_prompt:
        st.fill(x[:, :n_prompt])
    for t in range(n):
        ref.append(x[None, :, t : t + 1])
        if t >= n_prompt:
            (st.write if fused else st.write_ref)(x[:, t], torch.tensor([t], device=DEV))
    q = ref.n_quantized
    assert q > 0
    torch.testing.assert_close(st.codes[:, :, :q], ref.codes[:, :, :q], rtol=0, atol=0)
    G = ref.G
    srows = q if ref.spec.axis == "tok" else q // G
    torch.testing.assert_close(st.scale[:, :, :srows], ref.scale[:, :, :srows], rtol=0, atol=0)
    if ref.lo is not None:
        torch.testing.assert_close(st.lo[:, :, :srows], ref.lo[:, :, :srows], rtol=0, atol=0)
    got = st.values(torch.tensor([n], device=DEV))[:, :, :n]
    torch.testing.assert_close(got, ref.dequantized(), rtol=0, atol=0)


@pytest.mark.parametrize("kspec,vspec", [("int4_ch_g16_r8", "int4_tok_r8"), ("int8_ch_g16", "int2_tok_g8")])
@pytest.mark.parametrize("n", [5, 40, 61])
def test_device_length_kernel_matches_twin(kspec, vspec, n):
    """attn_kvq_static (length on the device, ring windows, grid over the capacity) == the torch twin."""
    from workbench.runtime.fastkv import KVBlockCache, static_attention

    cap = 64
    x, y = _rows(n), _rows(n, seed=100)
    c = KVBlockCache(*(StaticKVSide(s, 2, 16, cap, torch.bfloat16, DEV) for s in (kspec, vspec)), None, None)
    c.k.fill(x)
    c.v.fill(y)
    q = torch.randn(8, 16, device=DEV)
    length = torch.tensor([n], device=DEV)
    ka, va = c.k.kernel_args(), c.v.kernel_args()
    got = attn_kvq_static(q[None], ka, va, length, 0.25, block_n=16, n_splits=3)[0]
    K, V = (s.values(length)[0, :, :n].repeat_interleave(4, 0) for s in (c.k, c.v))
    direct = (torch.softmax(q[:, None] @ K.transpose(-1, -2) * 0.25, -1) @ V)[:, 0]
    torch.testing.assert_close(got, direct, atol=1e-4, rtol=1e-4)
    os.environ["TRITON_INTERPRET"], old = "0", os.environ.get("TRITON_INTERPRET", "0")
    try:
        twin = static_attention(q.cpu(), _to_cpu(c), length.cpu(), 0.25)
    finally:
        os.environ["TRITON_INTERPRET"] = old
    torch.testing.assert_close(twin, direct.cpu(), atol=1e-5, rtol=1e-5)


def _to_cpu(c):
    for s in (c.k, c.v):
        for a in ("codes", "scale", "lo", "ring"):
            if getattr(s, a) is not None:
                setattr(s, a, getattr(s, a).cpu())
    return c


@triton.jit
def _offset_kernel(out_ptr, bh, per_head, pos, ROW: tl.constexpr):
    tl.store(out_ptr, head_base(bh, per_head) + pos * ROW)


def test_code_offsets_are_64_bit():
    """B = 64, Hkv = 8, a 32k prompt + 256 new tokens, int8 D = 128: the last row's offset is past 2^31."""
    bh, cap, row = 64 * 8 - 1, 32768 + 256, 128
    want = bh * cap * row + (cap - 1) * row
    assert want >= 2**31
    out = torch.zeros(1, dtype=torch.int64, device=DEV)
    _offset_kernel[(1,)](out, bh, cap * row, cap - 1, ROW=row)
    assert int(out) == want


def test_store_refuses_what_the_kernel_cannot_read():
    with pytest.raises(WorkbenchError, match="stores int2, int4, int8 codes only"):
        StaticKVSide("fp8_e4m3_tok", 2, 16, 64, torch.bfloat16, DEV)
    with pytest.raises(WorkbenchError, match="post-RoPE keys without _had"):
        StaticKVSide("int4_ch_had", 2, 16, 64, torch.bfloat16, DEV)
    k, v = (StaticKVSide(s, 2, 16, n, torch.bfloat16, DEV) for s, n in (("int4_ch_g16", 64), ("int4_tok", 8)))
    q, length = torch.randn(1, 4, 16, device=DEV), torch.tensor([8], device=DEV)
    with pytest.raises(ValueError, match="key capacity 64 != value capacity 8"):
        attn_kvq_static(q, k.kernel_args(), v.kernel_args(), length, 0.25)
    with pytest.raises(ValueError, match="precision 'bf16'"):
        attn_kvq_static(q, k.kernel_args(), k.kernel_args(), length, 0.25, precision="bf16")


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per row of [T, V] logits."""
    r = torch.log_softmax(ref_logits.float(), -1)
    return (r.exp() * (r - torch.log_softmax(logits.float(), -1))).sum(-1)


def test_fast_decoder_with_quantized_cache_equals_simulation(stories):
    """FastDecoder with K4V4 (+ one K8-only block) == the teacher-forced simulation on stories260K."""
    from workbench.measure.kvsim import kv_quantized
    from workbench.plan.plan import Plan
    from workbench.runtime.fastpath import FastDecoder

    model = copy.deepcopy(stories.model).to(DEV)
    kv = Plan(k="int4_ch_g8_r4", v="int4_tok_r4").resolve(model).kv
    kv["model.layers.1.self_attn"] = type(kv["model.layers.1.self_attn"])(k=kv["model.layers.0.self_attn"].k)
    torch.manual_seed(0)
    ids = torch.randint(1, 500, (24,), device=DEV)
    dec = FastDecoder(model, max_cache_len=40, mode="eager", kv=kv)
    with kv_quantized(model, kv):
        sim = model(input_ids=ids[None], use_cache=False).logits[0].float()
    # the fast path's fused matmuls / rotary differ from HF's by float ulps, so a value on a rounding
    # boundary can take the neighbouring code (max |diff| up to ~2e-2 on some id sequences): compare by KL
    pre = dec.logits(ids).float()  # the masked prefill over the whole sequence
    assert _kl(sim, pre).max() < 1e-5
    assert (pre.argmax(-1) == sim.argmax(-1)).all()
    # token-by-token decode through the store and the kernel: prompt of 6, then 18 steps teacher-forced
    dec.prefill(ids[:6])
    steps = []
    for t in range(6, 24):
        dec.tok.fill_(int(ids[t]))
        steps.append(dec._forward_step()[0].float())
        dec.pos.add_(1)
    got = torch.stack(steps)
    assert _kl(sim[6:], got).max() < 1e-5
    assert (got.argmax(-1) == sim[6:].argmax(-1)).all()
    plain = model(input_ids=ids[None], use_cache=False).logits[0].float()
    assert (got - plain[6:]).abs().max() > 1e-3  # the cache really is quantized
    assert dec.cache_bytes() < FastDecoder(model, max_cache_len=40, mode="eager").cache_bytes()


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_graph_decode_with_quantized_cache_equals_eager(stories):
    """The captured step (length on the device, no host sync) == the eager step; one block stays bf16."""
    from workbench.plan.plan import Plan
    from workbench.runtime.decode import make_decoder

    model = copy.deepcopy(stories.model).to(DEV).bfloat16()
    kv = Plan(k="int4_ch_g8_r4", v="int8_tok_r4").resolve(model).kv
    del kv["model.layers.2.self_attn"]  # one block keeps the bf16 cache
    prompt = torch.randint(1, 500, (11,)).tolist()
    runs = [make_decoder(model, 80, mode=m, kv=kv).generate(prompt, 40) for m in ("eager", "graph")]
    assert runs[0].tokens == runs[1].tokens
    assert "quantized KV cache in 4 of 5 blocks" in runs[1].notes
    with pytest.raises(WorkbenchError, match="K/V cache specs need the fast decode path"):
        make_decoder(model, 80, path="hf", kv=kv)


def test_generate_command_with_a_kv_plan(tmp_path, capsys, monkeypatch):
    """`workbench generate --plan` with k/v specs runs the quantized cache and reports its measured bytes
    (on the CPU through the torch twins: the interpreter would take minutes for 40 tokens)."""
    import json

    from tests.conftest import STORIES
    from workbench.cli import main

    if not STORIES.is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    plan = tmp_path / "kv.json"
    kv = {"k": "int4_ch_g8_r4", "v": "int8_tok"}
    plan.write_text(json.dumps({"format": "workbench.plan", "version": 2, "default": "bf16", **kv}))
    out = {}
    for name, extra in (("kv", ["--plan", str(plan)]), ("bf16", [])):
        argv = ["generate", "--model", str(STORIES), "--prompt", "Once", "--max-new-tokens", "40"]
        assert main(argv + ["--device", "cpu", "--mode", "eager", "--json"] + extra) == 0
        text = capsys.readouterr().out
        out[name] = json.loads(text)
    assert "quantized KV cache in 5 of 5 blocks" in out["kv"]["result"]["notes"]
    assert 0 < out["kv"]["kv_cache_bytes"] <= out["bf16"]["kv_cache_bytes"] / 2  # fp32 on the CPU


@pytest.mark.parametrize(
    "kspec,vspec,D",
    [
        ("int8_ch_g32", "int8_tok", 16),  # scales onto q and p, int8: one plane
        ("int4_ch_g32_r8_sym", "int4_tok_r8_sym", 16),  # 8 bytes per row: planes padded to 16 columns
        ("int8_ch_g16", "int2_tok_g8", 16),  # per-element value scales (G < D)
        ("int4_ch_g16", "int4_tok", 64),  # two planes of 32 channels
        ("int2_ch_g32_r4", "int2_tok_r4", 64),  # four planes of 16 channels
        ("int4_ch_g8", "int8_tok_g16", 32),  # key group < BLOCK_N: per-element key scales
        ("int8_ch_g16_r8", "int8_tok_r8", 64),  # int8_chunk 16: four planes of 16 channels per side
    ],
)
def test_planes_kernel_matches_dequant_kernel_and_twin(kspec, vspec, D):
    """The bit-plane kernel over splits (tf32x3; one-pass tf32 and fp16 within their rounding; a tail loop
    in smaller blocks; int8 rows in planes of 16 channels) == the dequantizing kernel == the cache's own
    dequantized values."""
    cap, n = 128, 100
    sides = [StaticKVSide(s, 2, D, cap, torch.bfloat16, DEV) for s in (kspec, vspec)]
    for i, sd in enumerate(sides):
        sd.fill(_rows(n, D=D, seed=7 * i))
    q = torch.randn(1, 8, D, device=DEV)
    length = torch.tensor([n], device=DEV)
    ka, va = (sd.kernel_args() for sd in sides)
    planes = attn_kvq_static(q, ka, va, length, 0.25, block_n=16, n_splits=3, impl="planes")
    dequant = attn_kvq_static(q, ka, va, length, 0.25, block_n=16, n_splits=3, impl="dequant")
    one = attn_kvq_static(q, ka, va, length, 0.25, block_n=16, n_splits=1, impl="planes")
    one_pass = attn_kvq_static(q, ka, va, length, 0.25, block_n=16, n_splits=3, precision="tf32")
    half = attn_kvq_static(q, ka, va, length, 0.25, block_n=16, n_splits=3, precision="fp16")
    tail = attn_kvq_static(q, ka, va, length, 0.25, block_n=32, n_splits=3, tail_n=16)
    chunked = attn_kvq_static(q, ka, va, length, 0.25, block_n=16, n_splits=3, int8_chunk=16)
    sel = attn_kvq_static(q, ka, va, length, 0.25, block_n=32, n_splits=3, tail_n=16, select_rows=True)
    K, V = (s.values(length)[0, :, :n].repeat_interleave(4, 0) for s in sides)

    def attend(q, K, V):
        return (torch.softmax(q[0, :, None] @ K.transpose(-1, -2) * 0.25, -1) @ V)[:, 0]

    direct = attend(q, K, V)
    torch.testing.assert_close(planes[0], direct, atol=1e-4, rtol=1e-4)
    # one tf32 pass (10-bit mantissas of q * scale and p * scale) may err, but by less than keeping the
    # same cache in bf16 would (q, K, V rounded to 8-bit mantissas, everything after in fp32)
    bf = [t.to(torch.bfloat16).float() for t in (q, K, V)]
    bf16_err = float((attend(*bf) - direct).abs().max())
    assert float((one_pass[0] - direct).abs().max()) <= max(bf16_err, 1e-4)
    assert float((half[0] - direct).abs().max()) <= max(bf16_err, 1e-4)
    assert float((half[0] - direct).abs().max()) > 1e-6  # the fp16 rounding did happen
    torch.testing.assert_close(tail, planes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, planes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked[0], direct, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sel, tail, atol=1e-6, rtol=1e-6)  # same arithmetic, rows selected
    torch.testing.assert_close(planes, dequant, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(planes, one, atol=1e-5, rtol=1e-5)


def test_planes_only_options_and_bad_tail_are_refused():
    sides = [StaticKVSide(s, 2, 16, 64, torch.bfloat16, DEV) for s in ("int8_ch_g16", "int8_tok")]
    q, length = torch.randn(1, 4, 16, device=DEV), torch.tensor([5], device=DEV)
    args = (q, *(sd.kernel_args() for sd in sides), length)
    with pytest.raises(ValueError, match="'fp16', tail_n, int8_chunk and select_rows are options of the"):
        attn_kvq_static(*args, 0.25, precision="fp16", impl="dequant")
    with pytest.raises(ValueError, match="int8_chunk 8 must be a power of two >= 16 and >= head dim 16 / 4"):
        attn_kvq_static(*args, 0.25, int8_chunk=8)
    with pytest.raises(ValueError, match="tail_n 8 must be a power of two in \\[16, block_n 32\\]"):
        attn_kvq_static(*args, 0.25, block_n=32, tail_n=8)
    with pytest.raises(ValueError, match="tail_n 64 must be a power of two"):
        attn_kvq_static(*args, 0.25, block_n=32, tail_n=64)


def test_unknown_kernel_is_refused():
    sides = [StaticKVSide(s, 2, 16, 64, torch.bfloat16, DEV) for s in ("int8_ch_g16", "int8_tok")]
    with pytest.raises(ValueError, match="kernel 'fast' \\(choose planes or dequant\\)"):
        attn_kvq_static(torch.randn(1, 4, 16, device=DEV), *(sd.kernel_args() for sd in sides),
                        torch.tensor([5], device=DEV), 0.25, impl="fast")  # fmt: skip
