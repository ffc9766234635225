"""Sensitivity scans on stories260K: proxy = Gram output error, kl from cached block inputs = full-model KL,
orderings, and resume after an interruption (in-process and a real SIGINT to the CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.measure.replay import BlockRunner
from workbench.measure.sensitivity import SensitivityTable, sensitivity_scan
from workbench.measure.simulate import calibration_grams, fake_quantized
from workbench.model.data import calibration_batches
from workbench.model.inventory import get_linear_weight, get_module
from workbench.quant.api import fake_quant
from workbench.quant.metrics import output_error

from .conftest import DATA, STORIES

SPECS = ["int2_g32", "int4_g32", "int8_ch"]
KW = dict(n_seqs=2, seq_len=64, calib_seqs=8, calib_seq_len=64, progress=False)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text((DATA / "calibration" / "tinystories.txt").read_text()[:5000])
    return str(path)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_proxy_is_gram_output_error(stories, text):
    tab = sensitivity_scan(stories, SPECS, "proxy", text=text, **KW)
    assert tab.complete and [x.name for x in tab.layers][-1] == "lm_head"
    grams = calibration_grams(stories, None, text, 8, 64, progress=False)
    name = "model.layers.2.mlp.down_proj"
    W = get_linear_weight(get_module(stories.model, name)).detach()
    assert tab.cost[name]["int4_g32"] == pytest.approx(
        output_error(W, fake_quant(W, "int4_g32"), grams[name]), rel=1e-6
    )
    for row in tab.cost.values():
        assert row["int2_g32"] > row["int4_g32"] > row["int8_ch"] > 0


def test_kl_from_cached_block_inputs_equals_full_model(stories, text):
    model = stories.model
    windows = calibration_batches(stories.tokenizer, text, 2, 64, seed=1)
    runner = BlockRunner(model)
    runner.capture(windows)
    for name, block in [
        ("model.layers.3.self_attn.v_proj", 3),
        ("model.layers.0.mlp.gate_proj", 0),
        ("lm_head", None),
    ]:
        W_hat = fake_quant(get_linear_weight(get_module(model, name)).detach(), "int3_g32")
        fast = runner.kl_from(block, {name: W_hat})
        with torch.no_grad():
            ref = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
            with fake_quantized(model, {name: "int3_g32"}):
                q = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
        direct = float((ref.exp() * (ref - q)).sum(-1).mean())
        assert fast == pytest.approx(direct, rel=1e-4, abs=1e-8) and fast > 0


@pytest.fixture(scope="module")
def kl_table(stories, text):
    return sensitivity_scan(stories, SPECS, "kl", text=text, **KW)


def test_fisher_proxy_estimates_kl(stories, text, kl_table):
    from scipy.stats import spearmanr

    fisher = sensitivity_scan(stories, SPECS, "proxy", text=text, importance="fisher", **KW)
    names = [x.name for x in kl_table.layers]
    a = [fisher.cost[n][s] for n in names for s in SPECS]
    b = [kl_table.cost[n][s] for n in names for s in SPECS]
    assert spearmanr(a, b).statistic > 0.95
    # a second-order estimate in nats: same order of magnitude as the measured KL at 4 bits
    ratios = sorted(fisher.cost[n]["int4_g32"] / kl_table.cost[n]["int4_g32"] for n in names)
    assert 0.3 < ratios[len(ratios) // 2] < 3.0


def test_kl_scan_and_importance(stories, text, kl_table):
    kl = kl_table
    for row in kl.cost.values():
        assert row["int2_g32"] > row["int4_g32"] > row["int8_ch"] >= 0
    imp = sensitivity_scan(
        stories, SPECS, "proxy", text=text, importance="kl", importance_spec="int4_g32", **KW
    )
    # the importance-weighted proxy is exact at its reference spec
    for x in kl.layers:
        assert imp.cost[x.name]["int4_g32"] == pytest.approx(kl.cost[x.name]["int4_g32"], rel=1e-6)


def test_resume_after_interrupt_in_process(stories, text, tmp_path):
    out = tmp_path / "sens.json"
    seen = []

    def stop_after_3(name):
        seen.append(name)
        if len(seen) == 3:
            raise KeyboardInterrupt

    some = [f"model.layers.{b}.{m}" for b in (0, 2, 4) for m in ("self_attn.k_proj", "mlp.down_proj")]
    some.append("lm_head")
    with pytest.raises(KeyboardInterrupt):
        sensitivity_scan(stories, SPECS, "kl", text=text, out=out, on_layer=stop_after_3, layers=some, **KW)
    partial = SensitivityTable.load(out)
    assert len(partial.done_layers()) == 3 and not partial.complete
    resumed = []
    tab = sensitivity_scan(
        stories, SPECS, "kl", text=text, out=out, on_layer=resumed.append, layers=some, **KW
    )
    assert resumed == [x.name for x in tab.layers][3:] and tab.complete and len(tab.layers) == 7
    fresh = sensitivity_scan(stories, SPECS, "kl", text=text, layers=some, **KW)
    for name, row in fresh.cost.items():
        assert tab.cost[name] == pytest.approx(row, rel=1e-6, abs=1e-9)
    with pytest.raises(WorkbenchError, match="holds a different scan"):
        sensitivity_scan(stories, SPECS[:2], "kl", text=text, out=out, layers=some, **KW)


def test_resume_after_sigint_to_cli(text, tmp_path):
    out = tmp_path / "cli.json"
    cmd = [
        sys.executable,
        "-m",
        "workbench.cli",
        "sensitivity",
        "--model",
        str(STORIES),
        "--specs",
        "int2_g32,int8_ch",
        "--method",
        "kl",
        "--text",
        text,
        "--scan-seqs",
        "2",
        "--seq-len",
        "64",
        "--calib-seqs",
        "8",
        "--calib-seq-len",
        "64",
        "--out",
        str(out),
        "--quiet",
    ]
    # SIG_DFL in the child: a suite started in the background (`cmd &`, nohup) ignores SIGINT, which the child
    # would inherit, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(
        cmd,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.is_file() and len(json.loads(out.read_text())["cost"]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"scan ended before it could be interrupted: {proc.stderr.read()!r}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and b"interrupted" in err
    partial = SensitivityTable.load(out)
    done = partial.done_layers()
    assert 2 <= len(done) < 36
    from workbench.cli import main

    assert main(cmd[3:] + ["--json"]) == 0  # the resume in this process: no second interpreter start-up
    tab = SensitivityTable.load(out)
    assert tab.complete and all(tab.cost[n] == partial.cost[n] for n in done)
