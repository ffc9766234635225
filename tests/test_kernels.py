"""Every dequant-matmul kernel against its plain-torch reference on random inputs.

Without CUDA the Triton interpreter runs the kernels on the CPU (``TRITON_INTERPRET=1`` is set before
triton is imported) on a small sweep; with CUDA the same tests run the full sweep on the GPU.  Outputs
are poisoned with NaN before each launch (``out=``), so an element the kernel fails to write fails the
test.  The reference itself is checked against a float64 dequantization of the original codes.
"""

from __future__ import annotations

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels
os.environ.setdefault("WORKBENCH_NO_TUNE", "1")  # the sweep checks the heuristic shapes (tuning is opt-in)

import itertools  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
from workbench.kernels import reference as R  # noqa: E402
from workbench.kernels.gemm_fp8 import gemm_fp8  # noqa: E402
from workbench.kernels.gemm_int import GemmConfig, gemm_int  # noqa: E402
from workbench.kernels.gemv_fp8 import gemv_fp8  # noqa: E402
from workbench.kernels.gemv_int import GemvConfig, gemv_int  # noqa: E402

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.quant.packing import (  # noqa: E402
    n_groups,
    pack_codes,
    prepare_fp8_params,
    prepare_group_params,
)

DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16]
BITS = [2, 3, 4, 8]
PER_CHANNEL = 1 << 30  # group_size >= K means one group per row
if CUDA:
    SHAPES = [(1, 33), (24, 172), (300, 1000), (256, 4096)]
    GROUPS = [32, 128, PER_CHANNEL]
    GEMV_ROWS = [1, 2, 3, 4]
    GEMM_ROWS = [5, 64]
else:
    SHAPES = [(1, 33), (24, 172), (40, 576)]
    GROUPS = [32, 128, PER_CHANNEL]
    GEMV_ROWS = [3]
    GEMM_ROWS = [17]
# fp16 output: ~1 ulp apart from the fp32 reference after rounding; bf16 has 3 fewer mantissa bits
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
INTERP_BF16_DOT = "triton interpreter: tl.dot on bfloat16 returns garbage (checked 3.9); runs on CUDA"


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(y).any(), "kernel left NaN (unwritten or poisoned) outputs"
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _make_int(N, K, bits, G, sym, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8, generator=g)
    ng = n_groups(K, G)
    scales = torch.rand(N, ng, generator=g) * 0.02 + 0.002
    zeros = None if sym else torch.rand(N, ng, generator=g) * (2**bits - 1)
    st, zt = prepare_group_params(scales, zeros, K, G)
    packed = pack_codes(codes, bits)
    to = lambda t: None if t is None else t.to(DEV)
    return codes, to(packed), to(st), to(zt)


def _x(M, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g).to(dtype).to(DEV)


def _poisoned(M, N, dtype):
    return torch.full((M, N), float("nan"), dtype=dtype, device=DEV)


# On the CPU (interpreter) bf16 runs on one shape only, (24, 172), at every width / group / symmetry: the
# dtype changes only the load and store casts, which K-tiling and masking (fp16 at every shape) do not
# touch; bf16 at (40, 576) cost ~45 s of the CPU sweep. CUDA runs the whole product.
INT_CASES = [
    c
    for c in itertools.product(SHAPES, BITS, GROUPS, [False, True], DTYPES)
    if CUDA or c[4] == torch.float16 or c[0] == (24, 172)
]


def _case_id(c):
    (N, K), bits, G, sym, dt = c
    gran = "ch" if G == PER_CHANNEL else f"g{G}"
    return f"N{N}-K{K}-w{bits}-{gran}-{'sym' if sym else 'asym'}-{str(dt)[6:]}"


@pytest.mark.parametrize("case", INT_CASES, ids=_case_id)
def test_gemv_int_matches_reference(case):
    (N, K), bits, G, sym, dt = case
    seed = zlib.crc32(_case_id(case).encode())
    _, packed, st, zt = _make_int(N, K, bits, G, sym, seed)
    for M in GEMV_ROWS:
        x = _x(M, K, dt, seed + M)
        y = gemv_int(x, packed, st, zt, bits, G, K, out=_poisoned(M, N, dt))
        ref = R.gemv_int_ref(x, packed, st, zt, bits, G, K)
        assert y.shape == (M, N) and y.dtype == dt
        assert _rel_err(y, ref) < TOL[dt], f"M={M}"


@pytest.mark.parametrize("case", INT_CASES, ids=_case_id)
def test_gemm_int_matches_reference(case):
    (N, K), bits, G, sym, dt = case
    if dt == torch.bfloat16 and not CUDA:
        pytest.skip(INTERP_BF16_DOT)
    seed = zlib.crc32(_case_id(case).encode()) + 7
    _, packed, st, zt = _make_int(N, K, bits, G, sym, seed)
    for M in GEMM_ROWS:
        x = _x(M, K, dt, seed + M)
        y = gemm_int(x, packed, st, zt, bits, G, K, out=_poisoned(M, N, dt))
        ref = R.gemm_int_ref(x, packed, st, zt, bits, G, K)
        assert _rel_err(y, ref) < TOL[dt], f"M={M}"


@pytest.mark.parametrize("G", [64, 256])
def test_other_group_sizes(G):
    """Group sizes outside the main sweep, every width, shorter last group (K=576 is not a multiple)."""
    N, K = 40, 576
    for bits in BITS:
        _, packed, st, zt = _make_int(N, K, bits, G, False, G + bits)
        x = _x(3, K, torch.float16, G)
        y = gemv_int(x, packed, st, zt, bits, G, K, out=_poisoned(3, N, torch.float16))
        ref = R.gemv_int_ref(x, packed, st, zt, bits, G, K)
        assert _rel_err(y, ref) < TOL[torch.float16], f"gemv w{bits}"
        x = _x(17, K, torch.float16, G)
        y = gemm_int(x, packed, st, zt, bits, G, K, out=_poisoned(17, N, torch.float16))
        ref = R.gemm_int_ref(x, packed, st, zt, bits, G, K)
        assert _rel_err(y, ref) < TOL[torch.float16], f"gemm w{bits}"


@pytest.mark.parametrize("bits", BITS)
def test_split_k_and_configs(bits):
    """Non-default launch shapes (split-K atomics, other blocks) compute the same function."""
    N, K, G = 40, 576, 64
    _, packed, st, zt = _make_int(N, K, bits, G, False, bits)
    x = _x(2, K, torch.float16, 1)
    ref = R.gemv_int_ref(x, packed, st, zt, bits, G, K)
    for cfg in [GemvConfig(block_n=8, tile_words=16, split_k=3), GemvConfig(block_n=32, tile_words=8)]:
        y = gemv_int(x, packed, st, zt, bits, G, K, config=cfg, out=_poisoned(2, N, torch.float16))
        assert _rel_err(y, ref) < TOL[torch.float16], str(cfg)
    x = _x(20, K, torch.float16, 2)
    ref = R.gemm_int_ref(x, packed, st, zt, bits, G, K)
    for cfg in [GemmConfig(block_m=16, block_n=32, block_k=32, split_k=4), GemmConfig(32, 16)]:
        y = gemm_int(x, packed, st, zt, bits, G, K, config=cfg, out=_poisoned(20, N, torch.float16))
        assert _rel_err(y, ref) < TOL[torch.float16], str(cfg)


@pytest.mark.parametrize("fixup", ["1", "0"], ids=["fixup", "zero_fill_cast"])
def test_gemv_split_k_fixup(fixup, monkeypatch):
    """Split-K of the CUDA-core GEMV finished inside the kernel (default; ``checks.fixup_enabled``) or by
    the zero-fill + cast launches: same function, and the fix-up leaves its persistent workspace and
    counters at zero (repeated launches, 1 and 4 rows sharing one workspace, give the reference again)."""
    from workbench.kernels.checks import split_workspace

    monkeypatch.setenv("WORKBENCH_SPLIT_FIXUP", fixup)
    N, K, G = 40, 576, 64
    for bits in [8, 4]:
        _, packed, st, zt = _make_int(N, K, bits, G, False, 30 + bits)
        for M in [4, 1, 4]:
            x = _x(M, K, torch.float16, M + bits)
            ref = R.gemv_int_ref(x, packed, st, zt, bits, G, K)
            cfg = GemvConfig(block_n=8, tile_words=16, split_k=3, num_warps=1)
            y = gemv_int(x, packed, st, zt, bits, G, K, config=cfg, out=_poisoned(M, N, torch.float16))
            assert _rel_err(y, ref) < TOL[torch.float16], f"w{bits} M={M}"
    ws, cnt = split_workspace(x, N, 8)
    assert not ws.any() and not cnt.any(), "fix-up left its workspace or counters non-zero"


FP8_CASES = list(itertools.product(SHAPES, DTYPES))


@pytest.mark.parametrize("case", FP8_CASES, ids=lambda c: f"N{c[0][0]}-K{c[0][1]}-{str(c[1])[6:]}")
def test_fp8_kernels_match_reference(case):
    (N, K), dt = case
    g = torch.Generator().manual_seed(N + K)
    w = (torch.randn(N, K, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    packed, scales = prepare_fp8_params(w.view(torch.uint8), torch.rand(N, generator=g) * 0.01 + 1e-3)
    packed, scales = packed.to(DEV), scales.to(DEV)
    for M in GEMV_ROWS:
        x = _x(M, K, dt, M)
        y = gemv_fp8(x, packed, scales, K, out=_poisoned(M, N, dt))
        assert _rel_err(y, R.gemv_fp8_ref(x, packed, scales, K)) < TOL[dt], f"gemv M={M}"
    y = gemv_fp8(x, packed, scales, K, config=GemvConfig(block_n=8, tile_words=8, split_k=3))
    assert _rel_err(y, R.gemv_fp8_ref(x, packed, scales, K)) < TOL[dt], "gemv split-K"
    if dt == torch.bfloat16 and not CUDA:
        pytest.skip(INTERP_BF16_DOT + " (GEMV part passed)")
    for M in GEMM_ROWS:
        x = _x(M, K, dt, M)
        y = gemm_fp8(x, packed, scales, K, out=_poisoned(M, N, dt))
        assert _rel_err(y, R.gemm_fp8_ref(x, packed, scales, K)) < TOL[dt], f"gemm M={M}"
    y = gemm_fp8(x, packed, scales, K, config=GemmConfig(block_m=16, block_n=32, block_k=32, split_k=2))
    assert _rel_err(y, R.gemm_fp8_ref(x, packed, scales, K)) < TOL[dt], "gemm split-K"


def test_fp8_decode_all_patterns():
    """All 254 finite E4M3 patterns (subnormals, +-0, +-448) decode exactly through GEMV and GEMM."""
    pats = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)  # drop NaNs
    P, K = pats.numel(), 16
    shift = (torch.arange(P)[:, None] + torch.arange(K)[None, :]) % P
    packed, scales = prepare_fp8_params(pats[shift].contiguous(), torch.ones(P))  # every pattern per column
    packed, scales = packed.to(DEV), scales.to(DEV)
    want = R.dequantize_fp8(packed, scales, K)  # [254, 16] float32, each value exact in fp16
    eye = torch.eye(K, dtype=torch.float16, device=DEV)
    for r in range(0, K, 4):  # one-hot rows pick single weights: y[i, n] = w[n, r + i]
        y = gemv_fp8(eye[r : r + 4].contiguous(), packed, scales, K, out=_poisoned(4, P, torch.float16))
        assert torch.equal(y, want[:, r : r + 4].t().half())
    y = gemm_fp8(eye, packed, scales, K, out=_poisoned(K, P, torch.float16))
    assert torch.equal(y, want.t().half())


def test_reference_matches_contract():
    """The torch reference equals W_hat = (codes - zeros) * scales (shorter last group) in float64."""
    N, K, G, bits = 5, 172, 64, 3
    codes, packed, st, zt = _make_int(N, K, bits, G, False, 3)
    x = _x(2, K, torch.float16, 4).cpu()
    idx = torch.arange(K) // G  # groups 0..2, the last 44 wide
    W = (codes.double() - zt.cpu().double().t()[:, idx]) * st.cpu().double().t()[:, idx]
    want = x.double() @ W.t()
    got = R.gemv_int_ref(x, packed.cpu(), st.cpu(), zt.cpu(), bits, G, K)
    assert _rel_err(got, want) < 1e-3


def test_bad_inputs_are_named():
    N, K, bits = 24, 172, 4
    _, packed, st, zt = _make_int(N, K, bits, 32, False, 0)
    x = _x(5, K, torch.float16, 0)
    with pytest.raises(WorkbenchError, match=r"takes 1\.\.4"):
        gemv_int(x, packed, st, zt, bits, 32, K)
    with pytest.raises(WorkbenchError, match=r"\[M, K=172\], got shape \(5, 170\)"):
        gemm_int(x[:, :170].contiguous(), packed, st, zt, bits, 32, K)
    with pytest.raises(WorkbenchError, match="float16 or bfloat16"):
        gemm_int(x.float(), packed, st, zt, bits, 32, K)
    with pytest.raises(WorkbenchError, match="group_size=16"):
        _, p16, s16, z16 = _make_int(N, K, bits, 16, False, 0)
        gemv_int(x[:2], p16, s16, z16, bits, 16, K)
    with pytest.raises(WorkbenchError, match="group_size=96"):
        _, p96, s96, z96 = _make_int(N, K, bits, 96, False, 0)
        gemm_int(x, p96, s96, z96, bits, 96, K)
    with pytest.raises(WorkbenchError, match=r"n_groups=3, N=24.*got torch.float16 \(6, 24\)"):
        gemm_int(x, packed, st, zt, bits, 64, K)  # scales are for g32 (6 groups), call says g64
    with pytest.raises(WorkbenchError, match="packed weight"):
        gemm_int(x, packed, st, zt, 2, 32, K)


DEQ_CASES = [
    c
    for c in itertools.product([(24, 172), (40, 576)], BITS, [32, 128, PER_CHANNEL], [False, True], DTYPES)
    if CUDA or c[1] in (3, 4)  # the interpreter checks the 3-bit planes and the nibbles; CUDA every width
]


@pytest.mark.parametrize("case", DEQ_CASES, ids=_case_id)
def test_dequantize_matches_reference(case):
    """The prefill route's Triton dequantization (``kernels/dequant.py``) against the float32 reference,
    and ``dense_matmul`` (dequantize into the scratch buffer, then x @ W_hat^T) against the GEMM's twin."""
    from workbench.kernels.dequant import dense_matmul, dequantize_int

    (N, K), bits, G, sym, dt = case
    seed = zlib.crc32(_case_id(case).encode()) + 3
    _, packed, st, zt = _make_int(N, K, bits, G, sym, seed)
    W = dequantize_int(packed, st, zt, bits, G, K, dt)
    assert W.shape == (N, K) and W.dtype == dt
    assert _rel_err(W, R.dequantize_int(packed, st, zt, bits, G, K)) < TOL[dt]
    x = _x(9, K, dt, seed)
    y = dense_matmul(x, packed, st, zt, bits, G, K, False, _poisoned(9, N, dt))
    assert _rel_err(y, R.gemm_int_ref(x, packed, st, zt, bits, G, K)) < TOL[dt]


@pytest.mark.parametrize("dt", DTYPES, ids=["fp16", "bf16"])
def test_dequantize_fp8_matches_reference(dt):
    from workbench.kernels.dequant import dequantize_fp8

    N, K = 40, 172
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(N, K, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    packed, scales = prepare_fp8_params(w.view(torch.uint8), torch.rand(N, generator=g) * 0.01 + 1e-3)
    packed, scales = packed.to(DEV), scales.to(DEV)
    W = dequantize_fp8(packed, scales, K, dt)
    assert _rel_err(W, R.dequantize_fp8(packed, scales, K)) < TOL[dt]


@pytest.mark.skipif(not CUDA, reason="the launchers take the dense route on CUDA only")
@pytest.mark.parametrize("dt", DTYPES, ids=["fp16", "bf16"])
def test_gemm_dense_route(dt, monkeypatch):
    """From ``dense_min_rows`` rows on, gemm_int / gemm_fp8 dequantize + cuBLAS: same function, every
    width, one scratch buffer shared by layers of different sizes (a small layer after a large one)."""
    monkeypatch.setenv("WORKBENCH_DENSE_ROWS", "64")
    cases = [((300, 1000), 4, 128), ((256, 4096), 3, 128), ((40, 576), 2, 64), ((24, 172), 8, 32)]
    for (N, K), bits, G in cases:
        _, packed, st, zt = _make_int(N, K, bits, G, False, N + bits)
        for M in [64, 300]:
            x = _x(M, K, dt, M + bits)
            y = gemm_int(x, packed, st, zt, bits, G, K, out=_poisoned(M, N, dt))
            assert _rel_err(y, R.gemm_int_ref(x, packed, st, zt, bits, G, K)) < TOL[dt], f"w{bits} M={M}"
            y = gemm_int(x, packed, st, zt, bits, G, K)
            assert _rel_err(y, R.gemm_int_ref(x, packed, st, zt, bits, G, K)) < TOL[dt], f"w{bits} M={M}"
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(300, 1000, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    packed, scales = prepare_fp8_params(w.view(torch.uint8), torch.rand(300, generator=g) * 0.01 + 1e-3)
    packed, scales = packed.to(DEV), scales.to(DEV)
    x = _x(128, 1000, dt, 1)
    y = gemm_fp8(x, packed, scales, 1000, out=_poisoned(128, 300, dt))
    assert _rel_err(y, R.gemm_fp8_ref(x, packed, scales, 1000)) < TOL[dt], "fp8"


def test_dequantize_row_span():
    """launch_dequant with rows (n0, n1) writes exactly those rows of W_hat (the pipelined dense route's
    chunks) and leaves the others as they were."""
    from workbench.kernels.dequant import launch_dequant

    N, K, bits, G = 200, 256, 4, 128
    _, packed, st, zt = _make_int(N, K, bits, G, False, 17)
    W = torch.full((N, K), 7.0, dtype=torch.float16, device=DEV)
    launch_dequant(packed, st, zt, bits, G, K, False, W, rows=(64, 136))
    ref = R.dequantize_int(packed, st, zt, bits, G, K)
    assert _rel_err(W[64:136], ref[64:136]) < TOL[torch.float16]
    assert bool((W[:64] == 7).all()) and bool((W[136:] == 7).all())


@pytest.mark.skipif(not CUDA, reason="the side-stream pipeline runs on CUDA only")
@pytest.mark.parametrize("chunks", [2, 3, 8])
def test_dense_route_pipelined(chunks, monkeypatch):
    """dense_matmul over row chunks (dequantize on a side stream beside the cuBLAS calls) equals the
    one-launch route bit for bit, into a fresh or a given output, layer after layer on one scratch."""
    from workbench.kernels.dequant import dense_matmul

    dt = torch.bfloat16
    for (N, K), bits, G in [((4096, 1024), 4, 128), ((1600, 512), 3, 64), ((2048, 768), 8, PER_CHANNEL)]:
        _, packed, st, zt = _make_int(N, K, bits, G, False, N + chunks)
        x = _x(256, K, dt, bits)
        monkeypatch.setenv("WORKBENCH_DENSE_CHUNKS", "1")
        y1 = dense_matmul(x, packed, st, zt, bits, G, K, False, None)
        monkeypatch.setenv("WORKBENCH_DENSE_CHUNKS", str(chunks))
        yc = dense_matmul(x, packed, st, zt, bits, G, K, False, _poisoned(256, N, dt))
        yn = dense_matmul(x, packed, st, zt, bits, G, K, False, None)
        torch.cuda.synchronize()
        assert torch.equal(y1, yc) and torch.equal(y1, yn), f"w{bits} N={N} chunks={chunks}"


MMA_SHAPES = [(300, 1024), (64, 256), (200, 1000), (4096, 4096), (100, 4224)]
MMA_GROUPS = [32, 64, 128, 256, PER_CHANNEL]


@pytest.mark.skipif(not CUDA, reason="the W4 tensor-core kernel is inline PTX: CUDA only")
@pytest.mark.parametrize("shape", MMA_SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
@pytest.mark.parametrize("G", MMA_GROUPS, ids=lambda g: "ch" if g == PER_CHANNEL else f"g{g}")
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_w4_mma_matches_reference(shape, G, sym, monkeypatch):
    """The tensor-core W4 path (gemv_int / gemm_int with fp16 or bf16 x and <= 16 rows); every launch
    shape on two cases (one K with a partial last step).  No tuning here: the heuristic launch shape."""
    from workbench.kernels.gemv_mma import SHAPE_CHOICES, w4_mma

    monkeypatch.setenv("WORKBENCH_W4_MMA", "1")
    N, K = shape
    seed = zlib.crc32(f"mma{N}{K}{G}{sym}".encode())
    _, packed, st, zt = _make_int(N, K, 4, G, sym, seed)
    for dt, rows in ((torch.float16, [1, 2, 3, 4, 5, 8, 9, 16]), (torch.bfloat16, [1, 3, 8, 9, 16])):
        for M in rows:
            x = _x(M, K, dt, seed + M)
            fn = gemv_int if M <= 4 else gemm_int
            y = fn(x, packed, st, zt, 4, G, K, out=_poisoned(M, N, dt))
            ref = R.gemv_int_ref(x, packed, st, zt, 4, G, K)
            assert _rel_err(y, ref) < TOL[dt], f"M={M} {dt}"
    if (N, K, G, sym) not in ((300, 1024, 128, False), (200, 1000, PER_CHANNEL, True)):
        return
    for M, dt in ((1, torch.float16), (16, torch.float16), (1, torch.bfloat16), (16, torch.bfloat16)):
        x = _x(M, K, dt, seed - M)
        ref = R.gemv_int_ref(x, packed, st, zt, 4, G, K)
        for shape in SHAPE_CHOICES:
            y = w4_mma(x, packed, st, zt, G, K, N, out=_poisoned(M, N, dt), shape=shape)
            assert _rel_err(y, ref) < TOL[dt], f"M={M} {dt} (block_n, split_k, two_steps)={shape}"


@pytest.mark.skipif(not CUDA, reason="the W4 tensor-core kernel is inline PTX: CUDA only")
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_w4_mma_split_k_fixup(dt, monkeypatch):
    """Split-K finished inside the kernel (WORKBENCH_W4_FIXUP=1): right on every split shape, and the
    persistent workspace / counters are left at zero (a second launch gives the same result)."""
    from workbench.kernels.gemv_mma import SHAPE_CHOICES, w4_mma

    monkeypatch.setenv("WORKBENCH_W4_FIXUP", "1")
    N, K, G = 300, 1024, 128
    _, packed, st, zt = _make_int(N, K, 4, G, False, 11)
    for M in [1, 3, 16]:
        x = _x(M, K, dt, 20 + M)
        ref = R.gemv_int_ref(x, packed, st, zt, 4, G, K)
        for shape in [c for c in SHAPE_CHOICES if c[1] > 1]:
            y1 = w4_mma(x, packed, st, zt, G, K, N, out=_poisoned(M, N, dt), shape=shape)
            y2 = w4_mma(x, packed, st, zt, G, K, N, out=_poisoned(M, N, dt), shape=shape)
            assert _rel_err(y1, ref) < TOL[dt], f"M={M} {shape}"
            assert _rel_err(y2, ref) < TOL[dt], f"M={M} {shape}: workspace not left at zero"


def test_w4_mma_decode_identities():
    """The fp16 bit tricks of the tensor-core decode, checked on every byte pair and random scales.

    Low nibbles OR 0x6400 read as fp16 are 1024 + q, high nibbles (4 bits up) OR 0x5400 are 64 + q;
    v * s - 1024 s (or - 64 s), formed exactly and rounded once (the fma), is fp16(q * s).
    """
    b = torch.arange(256, dtype=torch.int32)
    lo = ((b & 0x0F) | 0x6400).to(torch.int16).view(torch.float16).float()
    hi = ((b & 0xF0) | 0x5400).to(torch.int16).view(torch.float16).float()
    assert torch.equal(lo, 1024 + (b & 15).float()) and torch.equal(hi, 64 + (b >> 4).float())
    s = (torch.rand(4096, dtype=torch.float64) * 0.05 + 1e-4).half().double()
    q = torch.randint(0, 16, (4096,)).double()
    for base in (1024, 64):
        fused = ((base + q) * s - base * s).half()  # float64 holds the exact value: one rounding
        assert torch.equal(fused, (q * s).half())
        assert torch.equal((-base * s).half().double(), -base * s)  # the constant itself is exact
    # bf16 (activations in bf16): nibble OR 0x4300 = 128 + q (high nibbles shifted down first)
    lo16 = ((b & 0x0F) | 0x4300).to(torch.int16).view(torch.bfloat16).float()
    hi16 = (((b >> 4) & 0x0F) | 0x4300).to(torch.int16).view(torch.bfloat16).float()
    assert torch.equal(lo16, 128 + (b & 15).float()) and torch.equal(hi16, 128 + (b >> 4).float())
    sb = s.to(torch.bfloat16).double()
    fused = ((128 + q) * sb - 128 * sb).to(torch.bfloat16)
    assert torch.equal(fused, (q * sb).to(torch.bfloat16))
    assert torch.equal((-128 * sb).to(torch.bfloat16).double(), -128 * sb)
    # exact scheme: v - base is q exactly, and -z s of fp16 z, s is exact in fp32 (11 x 11 bits)
    assert torch.equal((lo - 1024).half().float(), (b & 15).float()) and torch.equal(
        hi16 - 128, (b >> 4).float()
    )
    z = torch.randint(0, 16, (4096,)).double() + torch.rand(4096, dtype=torch.float64).half().double()
    assert torch.equal((-z.half().double() * s).float().double(), -z.half().double() * s)


def test_tune_cache_picks_fastest_and_persists(tmp_path, monkeypatch):
    """kernels.tune: the fastest candidate is kept, written as JSON per GPU name and read back.

    The GPU timer is replaced by a table of times (this checks the cache logic, not a kernel)."""
    import json

    from workbench.kernels import tune

    monkeypatch.setenv("WORKBENCH_TUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.delenv("WORKBENCH_NO_TUNE", raising=False)
    monkeypatch.setenv("WORKBENCH_TUNE", "1")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tune, "_MEM", {})
    monkeypatch.setattr(tune, "_USER", {})
    monkeypatch.setattr(tune, "_GPU", {})
    monkeypatch.setattr(tune, "_STATE", {"enabled": None, "cache": None})
    times = {(1, 2): 3.0, (4, 1): 1.0, (8, 8): 2.0}
    ran = []
    monkeypatch.setattr(tune, "time_graph", lambda fn, reps: (fn(), times[ran[-1]])[1])

    def run(c):
        if c == (9, 9):
            raise RuntimeError("out of shared memory")  # a candidate the compiler rejects is skipped
        ran.append(c)

    got = tune.pick("k", "M1|N8", torch.device("cpu"), [(1, 2), (9, 9), (4, 1), (8, 8)], lambda: run, (1, 2))
    assert got == (4, 1)
    assert json.loads((tmp_path / "tune.json").read_text()) == {"Fake GPU": {"k|M1|N8": [4, 1]}}
    monkeypatch.setattr(tune, "_MEM", {})  # a new process reads the file, times nothing
    monkeypatch.setattr(tune, "_USER", {})
    ran.clear()
    assert tune.pick("k", "M1|N8", torch.device("cpu"), [(1, 2)], lambda: run, (1, 2)) == (4, 1) and not ran


def test_shipped_tune_table_and_user_override(tmp_path, monkeypatch):
    """The picks measured on the lent H200 ship with the package and are read for that GPU name; the
    user cache overrides them; an unknown GPU gets nothing (the launchers' heuristics)."""
    import json

    from workbench.kernels import tune

    key = "w4|w4|M1|N14336|K4096|g128|asym|float16"
    monkeypatch.setenv("WORKBENCH_TUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(tune, "_MEM", {})
    monkeypatch.setattr(tune, "_USER", {})
    assert tune._load("NVIDIA H200")[key] == [0, 32, 4, 0]
    assert tune._load("Some Other GPU") == {}
    (tmp_path / "tune.json").write_text(json.dumps({"NVIDIA H200": {key: [0, 64, 8, 0]}}))
    monkeypatch.setattr(tune, "_MEM", {})
    assert tune._load("NVIDIA H200")[key] == [0, 64, 8, 0]


def test_w4_mma_default_shape_matches_h200_picks():
    """The heuristic launch shape (no tuned entry) reproduces the graph-timed winners on the H200
    (132 SMs; benchmarks/RESULTS.md, issue 13) up to the ties within 1 us there."""
    from workbench.kernels.gemv_mma import default_shape

    assert default_shape(14336, 4096, 132) == (64, 4, 0)  # measured best (32, 4, 0) 16.0, this 16.1 us
    assert default_shape(4096, 14336, 132) == (64, 8, 1)  # 15.5 us (two steps off: 17.9, split 4: 27.1)
    assert default_shape(4096, 4096, 132) == (64, 8, 0)  # 7.8 us (best (64, 8, 1) 7.4)
    assert default_shape(6144, 4096, 132) == (64, 8, 0)  # 9.1 us, the best
    assert default_shape(28672, 8192, 132) == (64, 2, 1)  # 46.3 us
    assert default_shape(14336, 4096, 132, M=16) == (64, 2, 1)  # 28.9 us (best (128, 2, 1) 28.5)
    assert default_shape(128256, 4096, 132) == (64, 1, 1)  # a wide lm_head: enough warps unsplit


@pytest.mark.parametrize("rows16", [False, True])
@pytest.mark.parametrize("has_zero", [False, True])
@pytest.mark.parametrize(
    "bf16,exact", [(False, False), (False, True), (True, True)], ids=["fp16", "fp16x", "bf16"]
)
def test_w4_mma_asm_operands(rows16, has_zero, bf16, exact):
    """The generated PTX of the tensor-core kernel uses exactly the operands its constraints declare:
    every input register is read (acc, words, x pairs [rows 8..15], s [, z]), outputs are $0-$7."""
    import re

    from workbench.kernels.gemv_mma import w4_asm

    asm, cons = w4_asm(rows16, has_zero, bf16, exact)
    kinds = cons.split(",")
    used = {int(i) for i in re.findall(r"\$(\d+)", asm)}
    assert kinds[:8] == ["=f"] * 8 and kinds[8:16] == ["f"] * 8 and max(used) < len(kinds)
    so = 88 if rows16 else 56
    # x args carry 8 elements per lane (rows a, b), the same pairs twice: elements 4..7 go unread;
    # fp16 s / z arrive as {s_a, s_a} x 2, {s_b, s_b} x 2: every second register goes unread
    dup_x = {24 + 8 * j + e for j in range(4 * (2 if rows16 else 1)) for e in range(4, 8)}
    dup_sz = {so + 1, so + 3} | ({so + 5, so + 7} if has_zero else set())
    unread = {i for i in range(8, len(kinds)) if i not in used}
    assert unread == dup_x | dup_sz, sorted(unread ^ (dup_x | dup_sz))
    assert asm.count("mma.sync.aligned.m16n8k16") == (32 if rows16 else 16)
    assert asm.count(".bf16.bf16.f32") == (asm.count("mma.sync") if bf16 else 0)
    assert asm.count("shr.b32") == (16 if bf16 else 0)  # bf16: high nibbles shifted down, 1 per 2 codes
    # exact: no scale in the decode, the fp32 scale / zero-point fma once per step per element
    assert asm.count("fma.rn.f32") == ((16 if rows16 else 8) if exact else 0)
    assert asm.count("{") == asm.count("}")
