"""benchmarks/bench_70b_stream.py at its tiny CPU shape: every phase runs, reports its numbers, the GPTQ
phase writes a model that reloads, and the FLOP model of the estimate counts the 70B shape right."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_70b_stream.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_70b_stream", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_every_phase(tmp_path):
    from workbench.runtime.serialize import load_quantized

    out = tmp_path / "tiny.json"
    res = _bench().main(["--tiny", "--quiet", "--out", str(out), "--write", str(tmp_path / "q")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    ph = res["phases"]
    assert set(ph) == {"inspect", "scan", "gptq"}
    assert ph["inspect"]["n_layers"] == 15 and ph["scan"]["n_layers"] == 14 and ph["gptq"]["n_layers"] == 14
    assert all(
        p["seconds"] > 0 and p["peak_host_rss_bytes"] > 0 and p["block_bytes"] > 0 for p in ph.values()
    )
    assert all(len(p["block_seconds"]) == 2 and p["projection"]["measured_blocks"] == 2 for p in ph.values())
    assert all(0 <= a <= b for p in ph.values() for a, b in zip(p["after_seconds"], p["block_seconds"]))
    assert "| gptq | 2 |" in res["markdown"]
    costs = ph["scan"]["extra"]["costs_of_first_layer"]
    assert costs["int2_g64"] > costs["int3_g128"] > costs["int4_g128"] > costs["int8_ch"] > 0
    model, plan = load_quantized(tmp_path / "q")
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "QuantLinear"
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


def test_flop_model_of_the_70b_shape():
    b = _bench()
    from workbench.presets import LLAMA3_70B

    lin = b.linears(LLAMA3_70B)
    assert len(lin) * LLAMA3_70B["num_hidden_layers"] == 560
    assert sum(N * K for _, N, K in lin) == 855_638_016
    f = b.phase_flops(LLAMA3_70B, 1000, 100)
    assert f["gptq_columns"] == 3 * 8192 + 28672  # q/k/v and gate/up stacked: 4 distinct inputs
    assert f["forward"] == 2 * 855_638_016 * 1000 + 4 * 1000 * 100 * 8192


def test_projection_to_80_blocks_from_measured_blocks():
    """Outside-the-blocks time as measured + 80 x the mean of the blocks after the first (warm-up)."""
    pr = _bench().project(total_s=20.0, block_s=[5.0, 3.0, 4.0], n_full=80, target=300)
    assert pr["per_block_s"] == 3.5 and pr["outside_blocks_s"] == 8.0 and pr["first_block_s"] == 5.0
    assert pr["seconds"] == 8.0 + 80 * 3.5 and pr["meets_target"] is True
    assert "PROJECTION to 80 blocks from 3 measured blocks" in pr["label"]
    assert _bench().project(10.0, [9.0], 80, 300)["seconds"] == 1.0 + 80 * 9.0  # one block: that one


def test_projection_only_when_blocks_are_missing():
    """A run over every block reports its wall time as measured; a partial run projects from its steady
    blocks (the first, with compilation, left out) plus the time outside the blocks."""
    project = _bench().project
    full = project(170.0, [3.0] + [2.1] * 79, 80, 300)
    assert not full["projected"] and full["seconds"] == 170.0 and full["label"].startswith("MEASURED")
    part = project(7.0, [3.0, 2.0], 80, 300)
    assert part["projected"] and part["seconds"] == 2.0 + 80 * 2.0 and part["meets_target"]
