"""Compile both split-K GEMVs for sm_90 offline, once per split-K finish; print registers and global stores.

    python benchmarks/splitk_resources.py

Finishes: ``atomic`` (fp32 red.add into a zero-filled buffer, cast after: the default at split < 8 for W4),
``fixup`` (the same adds into a persistent workspace, counters, the last program casts and re-zeroes),
``partials`` (plain fp32 stores into the split's own slice; ``kernels/split_partials.py``).  Kernels:
the W4 tensor-core GEMV (``gemv_mma``, bf16, exact scheme, 1 row, split 4, via
``profile_kernel.sass_histogram``) and the CUDA-core GEMV (``gemv_int._gemv_kernel``) at the decoder's
split-K shapes: W8 per channel 14336 x 4096 (8, 128, 4, 1) and W4 g128 4096 x 4096 (8, 128, 2, 1).
Registers, spill stack and SASS store counts from Triton's own cuobjdump; timing needs the GPU
(``benchmarks/gpu_splitk.sh``).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

FINISHES = ("atomic", "fixup", "partials")


def _resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    ops = collections.Counter(re.findall(r"\b(STG|REDG|ATOMG|BAR)\b", sass))
    return {
        "regs": int(re.search(r"REG:(\d+)", res).group(1)),
        "stack": int(re.search(r"STACK:(\d+)", res).group(1)),
        **dict(sorted(ops.items())),
    }


def gemv_int_resources(bits: int, group: int | None, K: int, cfg: tuple, finish: str) -> dict:
    """``_gemv_kernel`` at one row compiled for sm_90; cfg = (block_n, tile_words, split_k, num_warps)."""
    from workbench.kernels import gemv_int as G

    block_n, tile_words, split_k, warps = cfg
    per = 32 // bits
    gw, c = (tile_words, 1) if group is None else (group // per, tile_words // (group // per))
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16"}
    sig = ptrs | {"y_ptr": "*fp32"}  # every split-K finish writes fp32
    ints = [
        "N",
        "K",
        "NG",
        "KWL",
        "LO_WORDS",
        "TILES",
        "TILES_PER_SPLIT",
        "stride_xm",
        "stride_wn",
        "stride_ym",
    ]
    sig.update({k: "i32" for k in ints})
    sig.update({"o_ptr": "*bf16", "cnt_ptr": "*i32", "stride_om": "i32"})
    const = dict(
        M_ROWS=1, BITS=bits, PER=per, GW=gw, C=c, PER_CHANNEL=group is None, HAS_ZERO=group is not None
    )
    const.update(
        FP8=False, EVEN_K=K % (c * gw * per) == 0, X_BCAST=warps > 1, BLOCK_N=block_n, SPLIT_K=split_k
    )
    const.update(FIXUP=finish == "fixup", PARTIALS=finish == "partials")
    sig.update({k: "constexpr" for k in const})
    names = list(sig)
    aligned = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "y_ptr", "N", "K", "KWL", "stride_xm", "stride_wn"]
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=G._gemv_kernel, signature=sig, constexprs=const, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 64), options={"num_warps": warps})
    return _resources(ck.asm["cubin"])


def main() -> None:
    from profile_kernel import sass_histogram

    print(f"triton {triton.__version__}, sm_90, one row")
    for two in (False, True):
        for finish in FINISHES:
            line = sass_histogram(False, True, two, bf16=True, **{finish: True}).splitlines()[0]
            print(f"gemv_mma bf16 g128 (64, 4, {int(two)}) {finish:8s}: {line.split(', ', 1)[1]}")
    cases = [
        ("w8_ch 14336x4096", 8, None, 14336, (8, 128, 4, 1)),
        ("w4_g128 4096x4096", 4, 128, 4096, (8, 128, 2, 1)),
    ]
    for name, bits, group, K, cfg in cases:
        for finish in FINISHES:
            print(f"gemv_int {name} {cfg} {finish:8s}: {gemv_int_resources(bits, group, K, cfg, finish)}")


if __name__ == "__main__":
    main()
