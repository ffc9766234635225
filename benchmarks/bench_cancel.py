"""App jobs on a real model: how the progress bar fills and how fast a cancel stops a running job.

    python benchmarks/bench_cancel.py [--model default] [--tokens 4096] [--at 0.5] [--spec int4_g128]

Starts the state's evaluation of a uniform plan (cold reference cache: WORKBENCH_CACHE points at an empty
folder), records every progress value the job publishes, cancels once the bar passes `--at`, and prints
the seconds from `cancel()` to the job's "cancelled" state, whether the private model's weights are back
bit for bit, and how many distinct fractions the bar showed before the cancel. Then a full evaluation of
the same plan reports how many steps its bar took from 0 to 1.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--at", type=float, default=0.5, help="cancel once the bar passes this fraction")
    ap.add_argument("--spec", default="int4_g128")
    a = ap.parse_args()
    os.environ["WORKBENCH_CACHE"] = tempfile.mkdtemp(prefix="bench-cancel-")
    import torch

    from workbench.model.loading import load_model
    from workbench.ui.state import WorkbenchState

    s = WorkbenchState()
    s.set_model(load_model(a.model, progress=False))
    s.set_default(a.spec)
    with s.session.use() as private:
        before = {n: p.detach().clone() for n, p in private.model.named_parameters()}
    seen, passed = [], threading.Event()
    job = s.evaluate(max_tokens=a.tokens)
    job.param.watch(lambda e: (seen.append(e.new), e.new > a.at and passed.set()), "progress")
    assert passed.wait(600), f"the bar never passed {a.at}: {job.status}"
    t0 = time.perf_counter()
    job.cancel()
    job.join(600)
    stop_s = time.perf_counter() - t0
    with s.session.use() as private:
        same = all(torch.equal(p, before[n]) for n, p in private.model.named_parameters())
    print(f"model {a.model}, plan {a.spec}, {a.tokens} tokens; cancel at {seen[-1]:.3f} of the bar")
    rows = len(s.evaluations)
    print(f"cancel -> {job.state} in {stop_s:.3f} s; weights restored: {same}; rows adopted: {rows}")
    print(f"bar values before the cancel: {len(set(seen))}")
    full, t1 = [], time.perf_counter()
    job = s.evaluate(max_tokens=a.tokens)
    job.param.watch(lambda e: full.append(e.new), "progress")
    job.join()
    print(
        f"full evaluation: {job.state} in {time.perf_counter() - t1:.1f} s, {len(set(full))} bar values, "
        f"last {full[-1]:.3f}; KL {s.evaluations[-1]['KL (nats)']}"
    )


if __name__ == "__main__":
    main()
