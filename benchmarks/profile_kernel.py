"""Launch one kernel a few times on random data, for a profiler (``ncu``) to attach to.

    ncu -k regex:_gemv_kernel -c 1 --section SpeedOfLight --section WarpStateStats \\
        python benchmarks/profile_kernel.py --fmt w4_g128 --shape 4096x14336x1

No timing here (``bench_kernels.py`` times); this only builds the inputs the benchmark builds and calls
the launcher with its default (or a given) config.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from bench_kernels import FORMATS, _kernel_call, _make_weights
    from workbench.kernels.gemm_int import GemmConfig
    from workbench.kernels.gemv_int import GemvConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fmt", default="w4_g128", choices=list(FORMATS))
    ap.add_argument("--shape", default="4096x14336x1", help="KxNxM")
    ap.add_argument("--config", default=None, help="comma ints: GemvConfig (M<=4) or GemmConfig fields")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    K, N, M = (int(v) for v in a.shape.split("x"))
    cfg = None
    if a.config:
        vals = [int(v) for v in a.config.split(",")]
        cfg = GemvConfig(*vals) if M <= 4 else GemmConfig(*vals)
    gen = torch.Generator(device="cuda").manual_seed(0)
    wts, _ = _make_weights(a.fmt, N, K, 1, gen)
    x = torch.randn(M, K, device="cuda", generator=gen).half()
    call = _kernel_call(a.fmt, M, K, x, wts[0], cfg)
    for _ in range(a.reps):
        call()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
