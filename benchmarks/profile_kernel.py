"""Launch one kernel a few times on random data, for a profiler (``ncu``) to attach to.

    ncu -k regex:_gemv_kernel -c 1 --section SpeedOfLight --section WarpStateStats \\
        python benchmarks/profile_kernel.py --fmt w4_g128 --shape 4096x14336x1

No timing here (``bench_kernels.py`` times); this only builds the inputs the benchmark builds and calls
the launcher with its default (or a given) config (``WORKBENCH_W4_MMA=1`` for the tensor-core W4 path).

    python benchmarks/profile_kernel.py --sass [--rows16] [--sym] [--two-steps] [--fixup | --partials]

compiles the tensor-core W4 kernel for sm_90 without a GPU (Triton's own ptxas / cuobjdump) and prints
its registers and the SASS opcode histogram of the K loop (instructions per 64 weights of a lane).
"""

from __future__ import annotations

import argparse

import torch


def sass_histogram(
    rows16: bool,
    has_zero: bool,
    two_steps: bool,
    block_n: int = 64,
    bf16: bool = False,
    exact: bool = True,
    fixup: bool = False,
    partials: bool = False,
    atomic: bool = False,
) -> str:
    """Compile ``_w4_mma_kernel`` for sm_90 here (no GPU), check its layout, count the SASS of its K loop
    (split-K 4 with ``atomic``: fp32 red.add into one buffer; ``fixup``: finished in the kernel;
    ``partials``: stored per split, plain fp32); also the whole kernel's global stores / reductions."""
    import collections
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from workbench.kernels import gemv_mma as G

    asm, cons = G.w4_asm(rows16, has_zero, bf16, exact or bf16)
    act = "*bf16" if bf16 else "*fp16"
    ints = ["M", "N", "K2", "KWL", "STEPS", "STEPS_PER_SPLIT", "stride_x2", "stride_wn", "stride_ym"]
    split = 4 if fixup or partials or atomic else 1
    y_t = "*fp32" if split > 1 else act
    sig = {"x_ptr": act, "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": y_t}
    sig.update({k: "i32" for k in ints})
    const = dict(
        G_SHIFT=7,
        PER_CHANNEL=False,
        HAS_ZERO=has_zero,
        ROWS16=rows16,
        ONE_ROW=not rows16,
        EVEN_K=True,
        BLOCK_N=block_n,
        SPLIT_K=split,
        ASM=asm,
        CONS=cons,
        TWO_STEPS=int(two_steps),
        BF16=bf16,
    )
    sig.update({k: "constexpr" for k in const})
    sig.update({"o_ptr": act, "cnt_ptr": "*i32", "stride_om": "i32", "FIXUP": "constexpr"})
    sig["PARTIALS"] = "constexpr"
    const.update(FIXUP=fixup, PARTIALS=partials)
    names = list(sig)
    aligned = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "y_ptr", "N", "K2", "KWL", "stride_x2", "stride_wn"]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=G._w4_mma_kernel, signature=sig, constexprs=const, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": block_n // 16})
    G._check_layout(ck)  # raises if the loads lost the lane <-> fragment layout
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
        regs = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    body: list[str] = []
    for addr, txt in ins:  # the longest backward branch is the K loop
        m = re.search(r"BRA\s+.*?0x([0-9a-f]+)", txt)
        if m and int(m.group(1), 16) < addr:
            cand = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            body = cand if len(cand) > len(body) else body
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)
    per = 64 * (2 if two_steps else 1)
    reg = re.search(r"REG:(\d+)", regs)
    every = collections.Counter(t.split()[0].split(".")[0] for _, t in ins if not t.startswith("@"))
    every.update(t.split()[1].split(".")[0] for _, t in ins if t.startswith("@"))
    mem = {k: every[k] for k in ("STG", "REDG", "RED", "ATOMG", "BAR") if every[k]}
    return (
        f"triton {triton.__version__}, registers {reg.group(1) if reg else '?'}: {len(body)} SASS instr. "
        f"per {per} weights of a lane = {len(body) / per:.2f} per weight; kernel {mem}\n{ops.most_common()}"
    )


def main() -> None:
    from bench_kernels import FORMATS, _kernel_call, _make_weights
    from workbench.kernels.gemm_int import GemmConfig
    from workbench.kernels.gemv_int import GemvConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fmt", default="w4_g128", choices=list(FORMATS))
    ap.add_argument("--shape", default="4096x14336x1", help="KxNxM")
    ap.add_argument("--config", default=None, help="comma ints: GemvConfig (M<=4) or GemmConfig fields")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sass", action="store_true", help="compile the W4 tensor-core kernel here, count SASS")
    ap.add_argument("--rows16", action="store_true")
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--two-steps", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bf16 activations (bf16 decode and mma)")
    ap.add_argument("--rounded", action="store_true", help="fp16 scheme for groups < 128 (q s rounded)")
    ap.add_argument("--fixup", action="store_true", help="split-K 4 finished inside the kernel")
    ap.add_argument("--partials", action="store_true", help="split-K 4 as per-split fp32 partials")
    ap.add_argument("--atomic", action="store_true", help="split-K 4 with fp32 atomics (zero-fill + cast)")
    a = ap.parse_args()
    if a.sass:
        print(
            sass_histogram(
                a.rows16,
                not a.sym,
                a.two_steps,
                bf16=a.bf16,
                exact=not a.rounded,
                fixup=a.fixup,
                partials=a.partials,
                atomic=a.atomic,
            )
        )
        return
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
