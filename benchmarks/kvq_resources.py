"""Compile the split-K decode-attention kernel (kernels/attn_kvq.py) for sm_90 offline; print its resources.

    python benchmarks/kvq_resources.py

For each (bits, BLOCK_N, num_warps) on the Llama-3-8B head (D = 128, rep 4 padded to 16 rows, keys per
channel g32, values per token): registers per thread, spill stack bytes and HMMA count of the SASS, from
Triton's own cuobjdump. Timing needs the H200 (benchmarks/bench_kv.py, `kernel_configs`).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def resources(
    bits: int,
    block_n: int,
    warps: int,
    dev: bool = True,
    prec: str = "tf32x3",
    impl: str = "planes",
    stages=None,
) -> dict:
    """Registers, spill stack bytes, shared memory and HMMA instructions of the kernel `impl` compiled for
    sm_90 (dev: the device-length variant `attn_kvq_static` launches, ring windows)."""
    from workbench.kernels import attn_kvq as A

    sig = {p: "*fp32" for p in ("q_ptr", "m_ptr", "l_ptr", "acc_ptr")}
    sig.update({"kc": "*u8", "ks": "*fp16", "kl": "*fp16", "kw": "*bf16"})
    sig.update({"vc": "*u8", "vs": "*fp16", "vl": "*fp16", "vw": "*bf16"})
    sig.update({k: "i32" for k in ("n", "qk", "qv", "cap", "Wk", "Wv", "Hq", "Hkv")})
    sig.update(
        {"sm_scale": "fp32", "chunk": "i32", "n_splits": "i32", "len_ptr": "*i64", "Rk": "i32", "Rv": "i32"}
    )
    const = dict(K_BITS=bits, K_CH=True, K_G=32, K_SYM=False, V_BITS=bits, V_CH=False, V_G=128, V_SYM=False)
    const.update(D=128, D_P=128, BLOCK_N=block_n, BLOCK_H=16, DEV=dev, PREC=prec)
    sig.update({k: "constexpr" for k in const})
    fn = A._attn_kvq_planes_kernel if impl == "planes" else A._attn_kvq_split_kernel
    opts = {"num_warps": warps} | ({"num_stages": stages} if stages else {})
    ck = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 64), options=opts
    )
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    return {
        "regs": int(re.search(r"REG:(\d+)", res).group(1)),
        "stack": int(re.search(r"STACK:(\d+)", res).group(1)),
        "hmma": sass.count("HMMA"),
        "smem": ck.metadata.shared,
    }


def main() -> None:
    print(f"triton {triton.__version__}, sm_90, D=128")
    for impl in ("planes", "dequant"):
        for bits in (4, 8):
            for block_n, warps in ((32, 4), (64, 4), (64, 8)):
                r = resources(bits, block_n, warps, impl=impl)
                cfg = f"{impl:7s} int{bits} BLOCK_N={block_n:3d} warps={warps}"
                print(f"{cfg}: {r['regs']} regs, stack {r['stack']} B, smem {r['smem']} B, {r['hmma']} HMMA")


if __name__ == "__main__":
    main()
