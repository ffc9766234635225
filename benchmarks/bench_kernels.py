"""Kernel benchmark: low-bit dequant-matmul vs cuBLAS fp16, timed with CUDA graphs, against the roofline.

For each shape (K x N, rows M) and weight format it times cuBLAS fp16 ``x @ W^T`` and our kernel (GEMV
for M <= 4, tensor-core GEMM above) and prints time, ratio vs fp16 and percent of the memory roofline

    roofline = (packed weight bytes + scale/zero bytes + x bytes + y bytes) / measured copy bandwidth

where copy bandwidth is a large device-to-device copy (bytes read + written).  Timing: a CUDA graph of
``LAUNCHES`` launches cycling through enough weight copies that L2 (50 MB on H100) cannot hold them,
replayed ``REPLAYS`` times between events; the median replay / LAUNCHES is reported.  Inputs are random
(never zeros).  Each kernel variant is checked against the torch reference before it is timed.

    python benchmarks/bench_kernels.py [--json] [--sweep] [--out results.json] [--quick]

With ``WORKBENCH_SPLIT_PARTIALS=1`` the default-config GEMV rows go through the decoder's route instead
(``qlinear.int_linear`` / ``fp8_linear``: a split-K launch stores per-split partials, one reduction sums
them; ``kernels/split_partials.py``), for an A/B against the zero-fill + atomics + cast launches.
    workbench bench kernels [--json]        (calls run())
"""

from __future__ import annotations

import argparse
import datetime
import json as jsonlib
import math
import statistics
from dataclasses import asdict, dataclass, field

import torch

# (K, N, M): the issue's shapes (Llama-3-8B MLP up / down, Llama-3-70B-like, batched decode, prefill)
SHAPES = [(4096, 14336, 1), (14336, 4096, 1), (8192, 28672, 1), (4096, 14336, 16), (4096, 14336, 64)]
QUICK_SHAPES = [(4096, 14336, 1), (4096, 14336, 16)]
# name -> (bits, group size (0 = per channel), symmetric); "fp8" is FP8 E4M3 per channel
FORMATS = {
    "w4_g128": (4, 128, False),
    "w3_g128": (3, 128, False),
    "w2_g128": (2, 128, False),
    "w8_ch": (8, 0, True),
    "w8_g128": (8, 128, False),
    "fp8": (8, 0, True),
}
LAUNCHES = 20
REPLAYS = 15
L2_BYTES = 50 * 2**20  # replaced by the device's L2 size in run()


@dataclass
class Row:
    K: int
    N: int
    M: int
    fmt: str
    kernel: str
    config: str
    us: float
    fp16_us: float
    bytes: int
    roofline_us: float
    pct_roofline: float
    ratio_vs_fp16: float
    tried: list = field(default_factory=list)
    peers: dict = field(default_factory=dict)  # W4 g128: {"tinygemm": {"us", "err"}, "gemlite": {...}}


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + written), median of 20."""
    a = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    return 2 * nbytes / statistics.median(times)


def graph_time_us(calls: list) -> float:
    """Median time of one call (µs): a CUDA graph of LAUNCHES calls cycling through ``calls``."""
    for f in calls:  # compile / warm up outside the capture
        f()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(LAUNCHES):
            calls[i % len(calls)]()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPLAYS):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / LAUNCHES)
    del g
    return statistics.median(times)


def _copies(nbytes: int) -> int:
    """Weight copies so that one graph cycle streams >= 3x L2 from memory."""
    return max(2, math.ceil(3 * L2_BYTES / max(nbytes, 1)))


def _make_weights(fmt: str, N: int, K: int, n_copies: int, gen: torch.Generator):
    """Random packed weights in the kernel format: list of (packed, scales, zeros), bytes of one copy."""
    from workbench.quant.packing import n_groups, pack_codes, prepare_fp8_params, prepare_group_params

    bits, G, sym = FORMATS[fmt]
    out = []
    for _ in range(n_copies):
        if fmt == "fp8":
            w = (torch.randn(N, K, device="cuda", generator=gen) * 30).clamp(-448, 448)
            packed, s = prepare_fp8_params(
                w.to(torch.float8_e4m3fn).view(torch.uint8),
                torch.rand(N, device="cuda", generator=gen) * 1e-3,
            )
            out.append((packed, s, None))
            continue
        codes = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8, device="cuda", generator=gen)
        gs = G or K
        ng = n_groups(K, gs)
        scales = torch.rand(N, ng, device="cuda", generator=gen) * 0.01 + 1e-3
        zeros = None if sym else torch.rand(N, ng, device="cuda", generator=gen) * (2**bits - 1)
        st, zt = prepare_group_params(scales, zeros, K, gs)
        out.append((pack_codes(codes, bits), st, zt))
        del codes
    p, s, z = out[0]
    nbytes = p.numel() * 4 + s.numel() * s.element_size() + (0 if z is None else z.numel() * z.element_size())
    return out, nbytes


CUSTOM_CONFIGS: list | None = None  # set by --configs: explicit launch shapes to try


def _gemv_candidates(sweep: bool):
    from workbench.kernels.gemv_int import GemvConfig

    if CUSTOM_CONFIGS:
        return [GemvConfig(*c) for c in CUSTOM_CONFIGS]
    if not sweep:
        return [None]
    return [
        GemvConfig(16, 128, 1, 4),
        GemvConfig(8, 128, 1, 1),
        GemvConfig(4, 128, 1, 1),
        GemvConfig(8, 128, 2, 1),
        GemvConfig(8, 128, 4, 1),
        GemvConfig(8, 64, 1, 1),
    ]


def _gemm_candidates(M: int, sweep: bool):
    from workbench.kernels.gemm_int import GemmConfig

    if CUSTOM_CONFIGS:
        return [GemmConfig(*c) for c in CUSTOM_CONFIGS]
    if not sweep:
        return [None]
    if M <= 16:
        return [
            GemmConfig(16, 64, 128, 1, 4, 3),
            GemmConfig(16, 32, 128, 1, 4, 3),
            GemmConfig(16, 64, 64, 1, 4, 4),
            GemmConfig(16, 128, 128, 1, 8, 3),
            GemmConfig(16, 64, 128, 4, 4, 3),
            GemmConfig(16, 32, 64, 2, 2, 4),
        ]
    return [
        GemmConfig(64, 64, 128, 1, 4, 3),
        GemmConfig(64, 64, 64, 1, 4, 4),
        GemmConfig(64, 32, 128, 1, 4, 3),
        GemmConfig(32, 64, 64, 1, 4, 4),
    ]


def _default_config(fmt: str, M: int, N: int, K: int):
    """The launch shape the launchers pick by themselves (recorded with each result)."""
    from workbench.kernels.gemm_int import default_gemm_config
    from workbench.kernels.gemv_int import default_gemv_config

    bits = FORMATS[fmt][0]
    return default_gemv_config(M, N, K, bits) if M <= 4 else default_gemm_config(M, N, K, bits)


def _kernel_call(fmt: str, M: int, K: int, x, wt, cfg):
    from workbench.kernels.checks import split_partials_enabled
    from workbench.kernels.gemm_fp8 import gemm_fp8
    from workbench.kernels.gemm_int import gemm_int
    from workbench.kernels.gemv_fp8 import gemv_fp8
    from workbench.kernels.gemv_int import gemv_int

    bits, G, _ = FORMATS[fmt]
    packed, s, z = wt
    gs = G or K
    if cfg is None and M <= 4 and split_partials_enabled():  # the decoder's route: op + sum outside it
        from workbench.runtime.qlinear import fp8_linear, int_linear

        if fmt == "fp8":
            return lambda: fp8_linear(x, packed, s, K)
        return lambda: int_linear(x, packed, s, z, bits, gs, K)
    if fmt == "fp8":
        fn = gemv_fp8 if M <= 4 else gemm_fp8
        return lambda: fn(x, packed, s, K, config=cfg)
    fn = gemv_int if M <= 4 else gemm_int
    return lambda: fn(x, packed, s, z, bits, gs, K, config=cfg)


def _reference(fmt: str, K: int, x, wt):
    from workbench.kernels import reference as R

    bits, G, _ = FORMATS[fmt]
    packed, s, z = wt
    if fmt == "fp8":
        return R.dequant_matmul_fp8_ref(x, packed, s, K)
    return R.dequant_matmul_int_ref(x, packed, s, z, bits, G or K, K)


def bench_shape(K: int, N: int, M: int, fmts: list[str], bw: float, sweep: bool, log=print) -> list[Row]:
    from workbench.kernels.checks import split_partials_enabled

    partials = M <= 4 and split_partials_enabled()
    gen = torch.Generator(device="cuda").manual_seed(K * 7 + N + M)
    act_bytes = M * K * 2 + M * N * 2
    xs = [torch.randn(M, K, device="cuda", generator=gen).half() for _ in range(4)]
    n_fp16 = _copies(N * K * 2)
    Ws = [torch.randn(N, K, device="cuda", generator=gen).half() for _ in range(n_fp16)]
    fp16_us = graph_time_us([(lambda x=xs[i % 4], w=Ws[i]: x @ w.t()) for i in range(n_fp16)])
    del Ws
    log(f"K={K} N={N} M={M}: cuBLAS fp16 {fp16_us:.1f} us")
    rows = []
    for fmt in fmts:
        _set_tuning(fmt)
        probe, nbytes = _make_weights(fmt, N, K, 1, gen)
        wts, _ = _make_weights(fmt, N, K, _copies(nbytes) - 1, gen)
        wts = probe + wts
        roof_us = (nbytes + act_bytes) / bw * 1e6
        cands = _gemv_candidates(sweep) if M <= 4 else _gemm_candidates(M, sweep)
        tried = []
        for cfg in cands:
            label = str(asdict(cfg if cfg is not None else _default_config(fmt, M, N, K)))
            try:
                y = _kernel_call(fmt, M, K, xs[0], wts[0], cfg)()
                ref = _reference(fmt, K, xs[0], wts[0])
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                if not err < 2e-3:
                    tried.append({"config": label, "error": f"rel err {err:.2e}"})
                    log(f"  {fmt} {label}: WRONG (rel err {err:.2e})")
                    continue
                us = graph_time_us([_kernel_call(fmt, M, K, xs[i % 4], w, cfg) for i, w in enumerate(wts)])
            except Exception as e:  # a config the compiler rejects (e.g. out of shared memory)
                tried.append({"config": label, "error": repr(e)[:200]})
                log(f"  {fmt} {label}: FAILED {repr(e)[:200]}")
                continue
            if cfg is None:  # what the launcher's per-GPU tuning picked (kernels.tune), if it ran
                label = (_chosen(fmt, xs[0], N, K) or label) + (" +partials" if partials else "")
            tried.append({"config": label, "us": us, "pct_roofline": 100 * roof_us / us})
            pct = 100 * roof_us / us
            log(f"  {fmt:8s} {label}: {us:8.1f} us  {fp16_us / us:5.2f}x  {pct:5.1f}% roofline")
        ok = [t for t in tried if "us" in t]
        if not ok:
            continue
        best = min(ok, key=lambda t: t["us"])
        rows.append(
            Row(
                K,
                N,
                M,
                fmt,
                "mma" if best["config"].startswith("w4 [0,") else "gemv" if M <= 4 else "gemm",
                best["config"],
                best["us"],
                fp16_us,
                nbytes + act_bytes,
                roof_us,
                100 * roof_us / best["us"],
                fp16_us / best["us"],
                tried,
            )
        )
        if fmt == "w4_g128" and PEERS:
            rows[-1].peers = _time_peers(K, N, M, gen, log)
        del wts, probe
        torch.cuda.empty_cache()
    return rows


PEERS = True  # --no-peers turns tinygemm / GemLite off
TUNE_FORMATS: tuple = ()  # --tune: formats whose launch shape is tuned on this GPU first (kernels.tune)


def _set_tuning(fmt: str) -> None:
    from workbench.kernels import tune

    tune.enable(fmt in TUNE_FORMATS)


def _time_peers(K: int, N: int, M: int, gen, log) -> dict:
    """tinygemm and GemLite W4 g128 on the same shape, timed the same way (CUDA graphs, L2 rotation)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import kernel_peers as P

    out = {}
    for name, make in (("tinygemm", P.tinygemm_calls), ("gemlite", P.gemlite_calls)):
        got = make(K, N, M, P.n_copies_w4(N, K, L2_BYTES), gen, log)
        if got is None:
            continue
        calls, err = got
        try:
            us = graph_time_us(calls)
        except Exception as e:  # noqa: BLE001 - e.g. a peer that cannot be captured in a graph
            log(f"  {name}: timing failed ({repr(e)[:160]})")
            continue
        out[name] = {"us": us, "rel_err": err}
        log(f"  {name:8s} w4_g128: {us:8.1f} us  (rel err {err:.1e})")
        del calls
        torch.cuda.empty_cache()
    return out


def _chosen(fmt: str, x, N: int, K: int) -> str | None:
    """The tuned launch choice for this case: 'w4' (0 = tensor-core kernel (block_n, split_k, two_steps),
    1 = the other kernel's config), 'gemv' or 'gemm' (the config fields)."""
    from workbench.kernels.tune import shape_key, tuned_table

    bits, G, sym = FORMATS[fmt]
    key = shape_key(x, N, K, bits, G or K, not sym, fmt == "fp8")
    table = tuned_table()
    for kind in ("w4", "gemv", "gemm"):
        if f"{kind}|{key}" in table:
            return f"{kind} {table[f'{kind}|{key}']}"
    from workbench.kernels.gemv_mma import default_shape, mma_eligible, sm_count

    if fmt != "fp8" and mma_eligible(x, bits, G or K, K):  # no tuned entry: the heuristic launch shape
        return f"w4 {[0, *default_shape(N, K, sm_count(x.device), x.shape[0])]} (heuristic)"
    return None


def format_table(rows: list[Row], bw: float, device: str) -> str:
    lines = [
        f"device: {device}   copy bandwidth: {bw / 1e12:.2f} TB/s   (CUDA graphs, {LAUNCHES} launches)",
        f"{'K x N':>12} {'M':>3} {'format':>8} {'kernel':>6} {'us':>8} {'fp16 us':>8} {'vs fp16':>8} "
        f"{'roof us':>8} {'% roof':>7} {'tinygemm':>9} {'x tiny':>7} {'gemlite':>8} {'x gemlite':>9}",
    ]
    for r in rows:
        peer = ""
        for name in ("tinygemm", "gemlite"):
            p = r.peers.get(name)
            peer += f" {p['us']:8.1f} {p['us'] / r.us:7.2f}x" if p else f" {'-':>8} {'-':>8}"
        lines.append(
            f"{f'{r.K}x{r.N}':>12} {r.M:>3} {r.fmt:>8} {r.kernel:>6} {r.us:8.1f} {r.fp16_us:8.1f} "
            f"{r.ratio_vs_fp16:7.2f}x {r.roofline_us:8.1f} {r.pct_roofline:6.1f}%" + peer
        )
    return "\n".join(lines)


def run(
    json: bool = False,
    sweep: bool = False,
    quick: bool = False,
    out: str | None = None,
    formats: list[str] | None = None,
    shapes: list | None = None,
) -> dict:
    """Run on CUDA; print a table (or one JSON object with ``json=True``); return the results dict."""
    from workbench.errors import WorkbenchError

    if not torch.cuda.is_available():
        raise WorkbenchError(
            "bench kernels: needs a CUDA GPU (none found); the kernels' CPU path is the torch reference"
        )
    log = (lambda *a, **k: None) if json else print
    device = torch.cuda.get_device_name()
    global L2_BYTES
    L2_BYTES = torch.cuda.get_device_properties().L2_cache_size
    bw = copy_bandwidth()
    log(f"{device}: copy bandwidth {bw / 1e12:.3f} TB/s")
    rows = []
    for K, N, M in shapes or (QUICK_SHAPES if quick else SHAPES):
        rows += bench_shape(K, N, M, formats or list(FORMATS), bw, sweep, log)
        result = _result(device, bw, rows)
        if out:  # after every shape, so a run cut short keeps what it measured
            with open(out, "w") as f:
                jsonlib.dump(result, f, indent=1)
    if json:
        print(jsonlib.dumps(result))
    else:
        print(format_table(rows, bw, device))
    return result


def _result(device: str, bw: float, rows: list[Row]) -> dict:
    return {
        "format": "workbench.bench_kernels",
        "version": 1,
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "copy_bandwidth_Bps": bw,
        "launches_per_graph": LAUNCHES,
        "rows": [asdict(r) for r in rows],
        "tuned_launch_shapes": _tuned(),
        "tuner_times_us": __import__("workbench.kernels.tune", fromlist=["TIMES"]).TIMES,
    }


def _tuned() -> dict:
    from workbench.kernels.tune import tuned_table

    return tuned_table()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--sweep", action="store_true", help="try several launch configs per case, keep the best")
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    ap.add_argument("--formats", default=None, help=f"comma list of {','.join(FORMATS)}")
    ap.add_argument("--shapes", default=None, help="comma list of KxNxM, e.g. 4096x14336x1")
    ap.add_argument("--out", default=None, help="also write the JSON results to this file")
    ap.add_argument("--configs", default=None, help="';'-separated launch configs (comma ints) to try")
    ap.add_argument("--no-peers", action="store_true", help="skip tinygemm / GemLite")
    ap.add_argument("--tune", default="", help="formats to tune per GPU first (comma list or all)")
    a = ap.parse_args()
    global PEERS, TUNE_FORMATS
    PEERS = not a.no_peers
    TUNE_FORMATS = tuple(FORMATS) if a.tune == "all" else tuple(a.tune.split(","))
    if a.configs:
        global CUSTOM_CONFIGS
        CUSTOM_CONFIGS = [tuple(int(v) for v in c.split(",")) for c in a.configs.split(";")]
    shapes = [tuple(int(v) for v in t.split("x")) for t in a.shapes.split(",")] if a.shapes else None
    run(
        json=a.json,
        sweep=a.sweep,
        quick=a.quick,
        out=a.out,
        shapes=shapes,
        formats=a.formats.split(",") if a.formats else None,
    )


if __name__ == "__main__":
    main()
