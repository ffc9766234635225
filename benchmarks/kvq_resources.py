"""Compile the quantized-KV decode-attention kernels (kernels/attn_kvq*.py) for sm_90 offline: resources.

    python benchmarks/kvq_resources.py             # the decoder's launch x precision x cut (~5 min, 2 cores)
    python benchmarks/kvq_resources.py --cap 168   # each also under maxnreg 168 (3 CTAs per SM)
    python benchmarks/kvq_resources.py --sweep     # also BLOCK_N 32 / 64 x 4 / 8 warps, both kernels
    python benchmarks/kvq_resources.py --json out.json

Shape: the Llama-3-8B head (D = 128, GQA 4: rep 4 padded to BLOCK_H rows), keys per channel g32 and values
per token (one scale per token), asymmetric, device length with ring windows (what `attn_kvq_static` launches
for int4_ch_r32 / int4_tok_r32 and the int8 pair). The decoder's launch (`workbench.runtime.fastkv.LAUNCH`):
BLOCK_N 64, 4 warps, num_stages 1; q bf16 for the one-pass precisions (bf16 models), fp32 for tf32x3; the
Triton launcher's 16-divisibility hints of that launch. Per variant: registers per thread, spill stores /
loads in bytes (ptxas -v on Triton's PTX, the options Triton passes), stack frame, shared memory and HMMA
instructions of the SASS (Triton's own cuobjdump). Timing needs the H200 (benchmarks/bench_kv_step.py,
benchmarks/gpu_kvregs.sh).

Recorded 2026-12-04, Triton 3.9 (the H200 runs 3.6), registers / spill stores B (uncapped | maxnreg 168):

    kernel, cut                            int4 tf32   int4 fp16   int8 tf32    int8 fp16   tf32x3 int4 / int8
    default (the decoder's launch)         180 / 0     168 / 0     250 / 0      244 / 0     255/60 | 255/32
      under maxnreg 168                    168 / 116               168 / 168
    tail16+sel (+chunk64 for int8)         140 / 0     134 / 0     234 / 0      180 / 0     255/56 | 255/16
      under maxnreg 168 (128 for int4)     128 / 16    128 / 48    168 / 0      168 / 12

Before the divisibility hints every variant read 255 registers with 572-1476 B of spills (one-byte loads).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _ptxas(ptx: str) -> dict:
    """Registers and spill bytes ptxas reports for `ptx` (sm_90a; Triton's make_cubin runs the same ptxas
    with these flags)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [os.path.join(BIN, "ptxas-blackwell"), "-lineinfo", "-v", "--regAllocOptLevel=2"]
        cmd += ["--gpu-name=sm_90a"]
        run = subprocess.run(cmd + [src, "-o", src + ".o"], capture_output=True, text=True)
    log = run.stdout + run.stderr
    assert "Used" in log, f"ptxas gave no resource line: {log[-2000:]}"
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "ptxas_regs": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill_st": int(spill.group(1)),
        "spill_ld": int(spill.group(2)),
    }


def resources(
    bits: int,
    block_n: int = 64,
    warps: int = 4,
    dev: bool = True,
    prec: str = "tf32x3",
    impl: str = "planes",
    stages: int | None = 1,
    block_h: int = 16,
    tail_n: int | None = None,
    maxnreg: int | None = None,
    q: str | None = None,
    aligned: bool = True,
    int8_chunk: int | None = None,
    select_rows: bool = False,
) -> dict:
    """Resources of kernel `impl` ("planes" / "dequant") compiled for sm_90 (module docstring)."""
    from workbench.kernels import attn_kvq as A

    sig = {p: "*fp32" for p in ("q_ptr", "m_ptr", "l_ptr", "acc_ptr")}
    sig["q_ptr"] = f"*{q or ('fp32' if prec == 'tf32x3' else 'bf16')}"  # fastkv.kernel_precision's models
    sig.update({"kc": "*u8", "ks": "*fp16", "kl": "*fp16", "kw": "*bf16"})
    sig.update({"vc": "*u8", "vs": "*fp16", "vl": "*fp16", "vw": "*bf16"})
    sig.update({k: "i32" for k in ("n", "qk", "qv", "cap", "Wk", "Wv", "Hq", "Hkv")})
    sig.update(
        {"sm_scale": "fp32", "chunk": "i32", "n_splits": "i32", "len_ptr": "*i64", "Rk": "i32", "Rv": "i32"}
    )
    const = dict(K_BITS=bits, K_CH=True, K_G=32, K_SYM=False, V_BITS=bits, V_CH=False, V_G=128, V_SYM=False)
    const.update(D=128, D_P=128, BLOCK_N=block_n, BLOCK_H=block_h, DEV=dev, PREC=prec)
    fn = A.attn_kvq_planes_kernel if impl == "planes" else A.attn_kvq_dequant_kernel
    if "TAIL_N" in fn.arg_names:
        const["TAIL_N"] = tail_n or block_n
    if "CHUNK8" in fn.arg_names:
        const["CHUNK8"] = int8_chunk or 0
    if "SEL" in fn.arg_names:
        const["SEL"] = select_rows
    sig.update({k: "constexpr" for k in const})
    opts = {"num_warps": warps} | ({"num_stages": stages} if stages else {})
    opts |= {"maxnreg": maxnreg} if maxnreg else {}
    # what Triton's launcher specializes at the decoder's launch: 16-byte aligned pointers, and the integers
    # that are multiples of 16 (the capacity and n a multiple of 64, qk = qv = 0, Wk = R + G = 64, Hq 32,
    # chunk a multiple of BLOCK_N, R 32); not Wv = R + 1, Hkv 8, n_splits 33. Without these hints the
    # code bytes load one byte per instruction (ALIGNED False: the numbers before 2026-12-04).
    div16 = [k for k, t in sig.items() if t.startswith("*")] + "n qk qv cap Wk Hq chunk Rk Rv".split()
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div16} if aligned else {}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 64), options=opts)
    if os.environ.get("KVQ_DUMP"):
        open(os.environ["KVQ_DUMP"], "w").write(ck.asm["ttgir"])
    tool = os.path.join(BIN, "cuobjdump")
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
    } | _ptxas(ck.asm["ptx"])


# the register cuts of branch kvregs, as `attn_kvq_static` keywords (int8_chunk does nothing to int4)
CUTS = {
    "default": {},
    "tail16": {"tail_n": 16},
    "tail16+sel": {"tail_n": 16, "select_rows": True},
    "tail16+sel+chunk64": {"tail_n": 16, "select_rows": True, "int8_chunk": 64},
}


def variants(sweep: bool, cap: int | None) -> list[dict]:
    """The decoder's launch for int4 / int8 in every dot precision and cut (cap: also under maxnreg cap),
    then (sweep) other launch shapes of the default kernels."""
    out = [
        {"impl": "planes", "bits": bits, "prec": prec, "cut": cut} | kw | extra
        for bits in (4, 8)
        for prec in ("tf32", "fp16", "tf32x3")
        for cut, kw in CUTS.items()
        if bits == 8 or "int8_chunk" not in kw
        for extra in ([{}, {"maxnreg": cap}] if cap else [{}])
    ]
    if sweep:
        out += [
            {"impl": impl, "bits": bits, "block_n": bn, "warps": w, "stages": None}
            for impl in ("planes", "dequant")
            for bits in (4, 8)
            for bn, w in ((32, 4), (64, 4), (64, 8))
        ]
    return out


def _row(v: dict) -> dict:
    return v | resources(**{k: x for k, x in v.items() if k != "cut"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="also other BLOCK_N / warps and the dequant kernel")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cap", type=int, help="also compile every cut under this maxnreg (168: 3 CTAs / SM)")
    a = p.parse_args()
    print(f"triton {triton.__version__}, sm_90, D=128, keys ch g32 / values tok, asym, device length")
    rows = []
    with ProcessPoolExecutor(a.jobs) as ex:
        for r in ex.map(_row, variants(a.sweep, a.cap)):
            cfg = f"{r['impl']:7s} int{r['bits']} {r.get('prec', 'tf32x3'):6s} {r.get('cut', ''):18s}"
            cfg += f" BLOCK_N={r.get('block_n', 64):3d} warps={r.get('warps', 4)} stages={r.get('stages', 1)}"
            cfg += f" maxnreg={r['maxnreg']}" if r.get("maxnreg") else ""
            res = f"{r['regs']} regs, spill st/ld {r['spill_st']}/{r['spill_ld']} B, stack {r['stack']} B"
            print(f"{cfg}: {res}, smem {r['smem']} B, {r['hmma']} HMMA", flush=True)
            rows.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
