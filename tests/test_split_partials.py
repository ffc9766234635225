"""Split-K partials (kernels/split_partials.py, opt-in WORKBENCH_SPLIT_PARTIALS=1) against the references
and against the default atomic path.

Each split program stores its fp32 partials into its own slice of [split, M, N]: every slice must equal
x[:, cols_s] @ W_hat[:, cols_s]^T over that program's columns (fp32 rounding), every element must be
written (outputs poisoned with NaN), and the summed result must equal the atomic path's to within one
rounding of the output dtype (the fp32 sums may add in another order).  Then the plan made before the op,
the custom ops' fake shapes, and torch.compile: the sum and cast fused into the op that reads the output.
Without CUDA the Triton interpreter runs the kernels on the CPU (the W4 tensor-core kernel, inline PTX,
only on CUDA).
"""

from __future__ import annotations

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels
os.environ.setdefault("WORKBENCH_NO_TUNE", "1")  # heuristic shapes (tuning is opt-in)

import itertools  # noqa: E402
import re  # noqa: E402
import zlib  # noqa: E402
from dataclasses import astuple  # noqa: E402

import pytest  # noqa: E402
from workbench.kernels import reference as R  # noqa: E402
from workbench.kernels.gemv_fp8 import gemv_fp8  # noqa: E402
from workbench.kernels.gemv_int import GemvConfig, gemv_int  # noqa: E402
from workbench.kernels.split_partials import (  # noqa: E402
    gemv_fp8_partials,
    gemv_int_partials,
    launch_split,
    plan_split,
    sum_partials,
    sum_partials_ref,
)

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.quant.packing import (  # noqa: E402
    n_groups,
    pack_codes,
    packed_words,
    prepare_fp8_params,
    prepare_group_params,
)

DEV = "cuda" if CUDA else "cpu"
BITS = [2, 3, 4, 8]
PER_CHANNEL = 1 << 30
if CUDA:
    SHAPES = [(1, 33), (24, 172), (300, 1000), (256, 4096)]
    ROWS = [1, 2, 3, 4]
else:
    SHAPES = [(1, 33), (24, 172), (40, 576)]
    ROWS = [1, 3]  # the int sweep takes one of them per case (by its seed) to halve the interpreter's time
GROUPS = [32, 128, PER_CHANNEL]
# split-K launch shapes: 3 splits of small tiles (8 words: every case but K = 33 splits), and the heuristic's
# own split-K shape for 8-bit / 4-bit weights at N <= 4096 (default_gemv_config)
CONFIGS = [GemvConfig(block_n=8, tile_words=8, split_k=3, num_warps=1), GemvConfig(8, 128, 4, 1)]
if CUDA:
    CONFIGS.append(GemvConfig(16, 128, 2, 4))
PARTIAL_TOL = 1e-5  # fp32 partials vs the fp32 reference of the same columns


def _gid(c):
    (N, K), bits, G, sym, dt = c
    gran = "ch" if G == PER_CHANNEL else f"g{G}"
    return f"N{N}-K{K}-w{bits}-{gran}-{'sym' if sym else 'asym'}-{str(dt)[6:]}"


def _plan(cfg, K, bits, G):
    launch = (1, *astuple(cfg))
    return (*launch, launch_split(launch, K, bits, G))


CASES = [  # bf16 at one shape on the CPU, as tests/test_kernels.py; only cases some config splits
    c
    for c in itertools.product(SHAPES, BITS, GROUPS, [False, True], [torch.float16, torch.bfloat16])
    if (CUDA or c[4] == torch.float16 or c[0] == (24, 172))
    and any(_plan(cfg, c[0][1], c[1], c[2])[-1] > 1 for cfg in CONFIGS)
]


def _make_int(N, K, bits, G, sym, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8, generator=g)
    ng = n_groups(K, G)
    scales = torch.rand(N, ng, generator=g) * 0.02 + 0.002
    zeros = None if sym else torch.rand(N, ng, generator=g) * (2**bits - 1)
    st, zt = prepare_group_params(scales, zeros, K, G)
    to = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return to(pack_codes(codes, bits)), to(st), to(zt)


def _x(M, K, dtype, seed):
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)


def _make_fp8(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    packed, scales = prepare_fp8_params(w.view(torch.uint8), torch.rand(N, generator=g) * 0.01 + 1e-3)
    return packed.to(DEV), scales.to(DEV)


def _nan(shape):
    return torch.full(shape, float("nan"), dtype=torch.float32, device=DEV)


def _rel(a, b):
    assert not torch.isnan(a).any(), "partials left NaN (an element no split program stored)"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _within_one_rounding(y, y_atomic, partials, added=None):
    """Both are the same fp32 sum of ``partials`` rounded to the output dtype, possibly added in another
    order: they differ by at most the reordering error of fp32 plus one rounding of the dtype.  ``added``:
    y_atomic = r + that sum, and one side may have rounded the sum before the add (eager) and the other
    not (inductor): one more rounding of the sum itself."""
    assert y.dtype == y_atomic.dtype and y.shape == y_atomic.shape
    eps = torch.finfo(y.dtype).eps
    reorder = partials.shape[0] * torch.finfo(torch.float32).eps * partials.abs().sum(0).float()
    bound = 2 * eps * y_atomic.float().abs() + reorder + torch.finfo(y.dtype).tiny
    if added is not None:
        bound = bound + 2 * eps * added.float().abs()
    bad = (y.float() - y_atomic.float()).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outputs differ beyond rounding"


@pytest.mark.parametrize("case", CASES, ids=_gid)
def test_gemv_int_partials_match_reference_and_atomic_path(case, monkeypatch):
    (N, K), bits, G, sym, dt = case
    seed = zlib.crc32(_gid(case).encode())
    packed, st, zt = _make_int(N, K, bits, G, sym, seed)
    monkeypatch.setenv("WORKBENCH_SPLIT_FIXUP", "0")  # the zero-fill + atomics + cast path to compare with
    ran = 0
    rows = ROWS if CUDA else [ROWS[seed % len(ROWS)]]
    for M, cfg in itertools.product(rows, CONFIGS):
        plan = _plan(cfg, K, bits, G)
        if plan[-1] == 1:
            continue
        ran += 1
        x = _x(M, K, dt, seed + M)
        p = gemv_int_partials(x, packed, st, zt, bits, G, K, plan, out=_nan((plan[-1], M, N)))
        ref = R.gemv_int_partials_ref(x, packed, st, zt, bits, G, K, plan)
        assert p.shape == ref.shape and p.dtype == torch.float32
        assert _rel(p, ref) < PARTIAL_TOL, f"M={M} {cfg}: slices differ from their columns' reference"
        y_atomic = gemv_int(x, packed, st, zt, bits, G, K, config=cfg)
        _within_one_rounding(sum_partials(p, dt), y_atomic, p)
    assert ran, "CASES holds only cases that split"


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gemv_fp8_partials_match_reference_and_atomic_path(dt, monkeypatch):
    monkeypatch.setenv("WORKBENCH_SPLIT_FIXUP", "0")
    for N, K in SHAPES[1:]:
        packed, scales = _make_fp8(N, K, N)
        for M, cfg in itertools.product(ROWS, [GemvConfig(8, 8, 3, 1), GemvConfig(8, 128, 4, 1)]):
            plan = _plan(cfg, K, 8, K)
            if plan[-1] == 1:
                continue
            x = _x(M, K, dt, M + K)
            p = gemv_fp8_partials(x, packed, scales, K, plan, out=_nan((plan[-1], M, N)))
            assert _rel(p, R.gemv_fp8_partials_ref(x, packed, scales, K, plan)) < PARTIAL_TOL, f"N{N} M={M}"
            _within_one_rounding(sum_partials(p, dt), gemv_fp8(x, packed, scales, K, config=cfg), p)


def test_partials_against_in_kernel_fixup(monkeypatch):
    """The other split-K finish (counters + last program casts) gives the same outputs."""
    monkeypatch.setenv("WORKBENCH_SPLIT_FIXUP", "1")
    N, K, G = 40, 576, 64
    cfg = GemvConfig(8, 16, 3, 1)
    for bits in [8, 4]:
        packed, st, zt = _make_int(N, K, bits, G, False, 50 + bits)
        for M in [4, 1]:
            x = _x(M, K, torch.float16, M)
            p = gemv_int_partials(x, packed, st, zt, bits, G, K, _plan(cfg, K, bits, G))
            y = gemv_int(x, packed, st, zt, bits, G, K, config=cfg)
            _within_one_rounding(sum_partials(p, x.dtype), y, p)


@pytest.mark.parametrize("split", [2, 3, 8])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_sum_partials_matches_torch(split, dt):
    """The eager one-launch sum against its torch twin, with M * N not a multiple of the block."""
    for M, N in [(1, 40), (3, 1500), (4, 4096)]:
        p = torch.randn(split, M, N, generator=torch.Generator().manual_seed(M + N)).mul(30).to(DEV)
        y = sum_partials(p, dt)
        ref = sum_partials_ref(p, dt)
        assert y.dtype == dt and y.shape == (M, N)
        _within_one_rounding(y, ref, p)
        exact = p.double().sum(0)
        fp32 = split * torch.finfo(torch.float32).eps * p.double().abs().sum(0)
        assert ((y.double() - exact).abs() <= torch.finfo(dt).eps * exact.abs() + fp32).all()


def test_plan_split_follows_the_launcher(monkeypatch):
    """Off unless WORKBENCH_SPLIT_PARTIALS=1; then the heuristic shape with its split, None where the launch
    does not split (wide N, one tile along K) or is not a GEMV (> 4 rows)."""
    dt, cpu = torch.float16, torch.device("cpu")
    monkeypatch.delenv("WORKBENCH_SPLIT_PARTIALS", raising=False)
    assert plan_split(1, 4096, 4096, 8, 4096, False, False, dt, cpu) is None
    monkeypatch.setenv("WORKBENCH_SPLIT_PARTIALS", "1")
    assert plan_split(1, 4096, 4096, 8, 4096, False, False, dt, cpu) == (1, 8, 128, 4, 1, 4)  # w8, N <= 4096
    assert plan_split(2, 4096, 4096, 4, 128, True, False, dt, cpu) == (1, 8, 128, 2, 1, 2)  # w4 g128
    assert plan_split(1, 4096, 4096, 8, 4096, False, True, dt, cpu) == (1, 8, 128, 4, 1, 4)  # fp8
    assert plan_split(1, 14336, 4096, 8, 4096, False, False, dt, cpu) is None  # wide N: unsplit
    assert plan_split(5, 4096, 4096, 8, 4096, False, False, dt, cpu) is None  # the GEMM's rows
    assert plan_split(1, 4096, 64, 8, 64, False, False, dt, cpu) is None  # one tile along K
    assert plan_split(1, 4096, 1100, 8, 1100, False, False, dt, cpu) == (1, 8, 128, 4, 1, 3)  # 3 tiles: 3


def test_bad_plans_are_named():
    packed, st, zt = _make_int(40, 576, 8, 64, False, 1)
    x = _x(1, 576, torch.float16, 1)
    with pytest.raises(WorkbenchError, match="gemv_int_partials: plan must be"):
        gemv_int_partials(x, packed, st, zt, 8, 64, 576, (1, 8, 16, 3))
    with pytest.raises(WorkbenchError, match="W4 tensor-core kernel, got bits=8"):
        gemv_int_partials(x, packed, st, zt, 8, 64, 576, (0, 64, 2, 0, 2))
    with pytest.raises(WorkbenchError, match=r"partials out must be contiguous float32 \[3, 1, 40\]"):
        gemv_int_partials(x, packed, st, zt, 8, 64, 576, (1, 8, 16, 3, 1, 3), out=_nan((3, 40)))


def _op_inputs(bits=4, G=64):
    N, K = 40, 576
    packed, st, zt = _make_int(N, K, bits, G, False, 7)
    return _x(3, K, torch.float16, 7), packed, st, zt, bits, G, K


def test_partials_ops_fake_shapes_match_real():
    """The fake implementations (what torch.compile plans memory with) give the real outputs' shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from workbench.runtime.qlinear import fp8_matmul_partials, int_matmul_partials

    x, packed, st, zt, bits, G, K = _op_inputs()
    p8, s8 = _make_fp8(24, K, 3)
    calls = [
        (int_matmul_partials, (x, packed, st, zt, bits, G, K, list(_plan(CONFIGS[0], K, bits, G)))),
        (fp8_matmul_partials, (x, p8, s8, K, list(_plan(GemvConfig(8, 8, 3, 1), K, 8, K)))),
    ]
    for op, args in calls:
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        assert (fake.shape, fake.dtype, fake.device) == (real.shape, real.dtype, real.device)
        assert real.shape == (args[-1][-1], x.shape[0], args[1].shape[0])
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_int_linear_compiled_fuses_the_sum(monkeypatch):
    """resid + int_linear(x) under torch.compile: one graph, the partials op, and the sum over splits,
    the cast and the residual add in one generated kernel; same result as eager (one launch of the sum)
    and as the atomic path."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    from workbench.runtime.qlinear import int_linear, int_matmul_partials

    monkeypatch.setenv("WORKBENCH_SPLIT_PARTIALS", "1")
    x, packed, st, zt, bits, G, K = _op_inputs(8, PER_CHANNEL)
    x = x[:1]  # the heuristic splits 8-bit N <= 4096 in 4, here 2 tiles: 2 (default_gemv_config)
    resid = _x(1, packed.shape[0], torch.float16, 9)

    def step(x, resid):
        return resid + int_linear(x, packed, st, zt, bits, G, K)

    eager = step(x, resid)
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(step, fullgraph=True, dynamic=False), x, resid)
    src = "\n".join(code)
    assert "int_matmul_partials" in src and "workbench.int_matmul.default" not in src
    kernels = set(re.findall(r"(?:cpp|triton)_\w*fused_\w+", src))
    assert any("sum" in k and "add" in k for k in kernels), f"sum + add not fused: {sorted(kernels)}"
    plan = plan_split(1, packed.shape[0], K, bits, G, True, False, x.dtype, x.device)
    p = int_matmul_partials(x, packed, st, zt, bits, G, K, list(plan))
    assert plan[-1] == 2 and p.shape == (2, 1, packed.shape[0])
    y = sum_partials_ref(p, x.dtype)
    _within_one_rounding(out, eager, p, y)
    monkeypatch.setenv("WORKBENCH_SPLIT_PARTIALS", "0")
    _within_one_rounding(eager, step(x, resid), p, y)


MMA_CASES = [((300, 1024), 128, False), ((4096, 4096), 128, False), ((100, 4224), PER_CHANNEL, True)]


@pytest.mark.skipif(not CUDA, reason="the W4 tensor-core kernel is inline PTX: CUDA only")
@pytest.mark.parametrize("case", MMA_CASES, ids=lambda c: f"N{c[0][0]}-K{c[0][1]}-g{c[1]}-sym{int(c[2])}")
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_w4_mma_partials_match_reference_and_atomic_path(case, dt, monkeypatch):
    """Every split-K launch shape of the tensor-core kernel (st.global.f32 into its slice) against its
    columns' reference, and summed against the red.add path and the in-kernel fix-up."""
    from workbench.kernels.gemv_mma import SHAPE_CHOICES, mma_split, w4_mma

    (N, K), G, sym = case
    packed, st, zt = _make_int(N, K, 4, G, sym, N + K)
    for M, shape in itertools.product([1, 3, 4], [c for c in SHAPE_CHOICES if c[1] > 1]):
        plan = (0, *shape, mma_split(K, shape[1])[0])
        if plan[-1] == 1:
            continue
        x = _x(M, K, dt, M + shape[1])
        p = gemv_int_partials(x, packed, st, zt, 4, G, K, plan, out=_nan((plan[-1], M, N)))
        ref = R.gemv_int_partials_ref(x, packed, st, zt, 4, G, K, plan)
        assert _rel(p, ref) < 1e-4, f"M={M} {shape}"  # exact scheme; the mma adds in its own order
        y = sum_partials(p, dt)
        for fix in ("0", "1"):
            monkeypatch.setenv("WORKBENCH_W4_FIXUP", fix)
            monkeypatch.setenv("WORKBENCH_SPLIT_FIXUP", fix)
            _within_one_rounding(y, w4_mma(x, packed, st, zt, G, K, N, shape=shape), p)


@pytest.mark.skipif(not CUDA, reason="the launch choice on the GPU (tensor-core W4, tuned table)")
def test_planned_launch_is_the_launchers_choice(monkeypatch):
    """plan_split's launch = what gemv_int launches by default (choose_w4 / tune.pick without timing)."""
    from workbench.kernels import tune
    from workbench.kernels.gemv_int import default_gemv_config
    from workbench.kernels.gemv_mma import choose_w4
    from workbench.kernels.split_partials import planned_launch

    monkeypatch.setitem(tune._STATE, "enabled", False)  # cached choices only, as plan_split
    monkeypatch.setitem(tune._STATE, "cache", True)  # the shipped table is read (tune.tunable)
    never = lambda *a: pytest.fail("no timing pass expected")  # noqa: E731
    for (K, N), dt, M in itertools.product(
        [(4096, 4096), (14336, 4096), (4096, 6144), (4096, 28672)], [torch.float16, torch.bfloat16], [1, 4]
    ):
        x = _x(M, K, dt, 1)
        packed = torch.zeros(N, packed_words(K, 4), dtype=torch.int32, device=DEV)  # shapes only
        st = zt = torch.zeros(n_groups(K, 128), N, dtype=torch.float16, device=DEV)
        want = choose_w4(x, packed, st, zt, 128, K, N, [], never)
        assert planned_launch(M, N, K, 4, 128, True, False, dt, x.device) == want, f"w4 {K}x{N} M={M}"
        key = tune.shape_key(x, N, K, 8, K, False, False)
        want8 = tune.pick("gemv", key, x.device, [], never, astuple(default_gemv_config(M, N, K, 8)))
        assert planned_launch(M, N, K, 8, K, False, False, dt, x.device) == (1, *want8), f"w8 {K}x{N}"


@pytest.mark.skipif(not CUDA, reason="QuantLinear runs the kernels on CUDA inputs only")
@pytest.mark.parametrize("spec", ["int4_g128", "int8_ch", "fp8_e4m3"])
def test_quantlinear_partials_route(spec, monkeypatch):
    """A QuantLinear at 1 row in bf16 (the decoder's route; the fast path's `fuse.linear` the same), eager,
    in a CUDA graph and compiled with a residual add: partials on and off agree to one rounding; compiled,
    the sum, cast and add are one generated kernel."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    from workbench.quant.api import quantize_weight
    from workbench.runtime.qlinear import QuantLinear

    K, N = 14336, 4096
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(2)) * 0.02
    m = QuantLinear.from_quantized(quantize_weight(W, spec), name="down", dtype=torch.bfloat16, device=DEV)
    x = _x(1, K, torch.bfloat16, 3)
    resid = _x(1, N, torch.bfloat16, 4)
    monkeypatch.setenv("WORKBENCH_SPLIT_PARTIALS", "0")
    base = m(x)
    monkeypatch.setenv("WORKBENCH_SPLIT_PARTIALS", "1")
    args = m._kernel.args(m.spec, m.packed_buffers(), K)
    fp8 = spec.startswith("fp8")
    bits, G, zeros = (8, K, None) if fp8 else (args[3], args[4], args[2])
    plan = plan_split(1, N, K, bits, G, zeros is not None, fp8, x.dtype, x.device)
    assert plan is not None and plan[-1] > 1, f"{spec} {K}x{N}: expected a split-K launch, plan {plan}"
    p = gemv_fp8_partials(x, *args, plan) if fp8 else gemv_int_partials(x, *args, plan)
    y = m(x)
    _within_one_rounding(y, base, p)
    from workbench.runtime.fuse import fused_op, linear

    assert torch.equal(linear(fused_op([m]), x), y), "the fast path's linear takes another route"
    g = torch.cuda.CUDAGraph()
    out = torch.empty_like(y)
    m(x)  # warm-up outside the capture
    with torch.cuda.graph(g):
        out.copy_(m(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y), "graph replay differs from eager"
    torch._dynamo.reset()
    step = torch.compile(lambda x, r: r + m(x), fullgraph=True, dynamic=False)
    yc, code = run_and_get_code(step, x, resid)
    kernels = set(re.findall(r"triton_\w*fused_\w+", "\n".join(code)))
    assert any("sum" in k and "add" in k for k in kernels), f"sum + add not fused: {sorted(kernels)}"
    _within_one_rounding(yc, resid + y, p, y)
