"""Time loading the default model: first load (GGUF conversion) vs second load (safetensors cache).

Each load runs in a fresh process with an empty (first) or warm (second) cache folder, so nothing is
shared in memory. Reports the time of the `load_model` call alone and of the whole process (imports too).

    python benchmarks/bench_load.py [--model default]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_CHILD = """
import time, json, sys
t0 = time.perf_counter()
import transformers, torch  # noqa: F401  (imports are timed separately from the load itself)
t1 = time.perf_counter()
from workbench.model.loading import load_model
m = load_model(sys.argv[1], progress=False)
t2 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "load_s": t2 - t1}))
"""


def run(model: str = "default") -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, WORKBENCH_CACHE=cache)
        out = {}
        for label in ("first", "second"):
            t = time.perf_counter()
            r = subprocess.run(
                [sys.executable, "-c", _CHILD, model], env=env, capture_output=True, text=True, check=True
            )
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["process_s"] = time.perf_counter() - t
            out[label] = res
    out["speedup_load"] = out["first"]["load_s"] / out["second"]["load_s"]
    out["speedup_process"] = out["first"]["process_s"] / out["second"]["process_s"]
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    res = run(ap.parse_args().model)
    for k in ("first", "second"):
        r = res[k]
        print(f"{k:6s} load_model {r['load_s']:6.2f} s   whole process {r['process_s']:6.2f} s")
    print(f"speed-up: load_model {res['speedup_load']:.1f}x, whole process {res['speedup_process']:.1f}x")
