"""The CLI checks every argument that needs no model before it loads one: a bad path, plan, spec, text source,
number or device fails at once (exit status 2, one line naming the option and the value) instead of after
the seconds a model load takes.

The model loaders are replaced by a tripwire that raises, so a check that runs after the load would surface
as the tripwire's AssertionError, not as the expected message; `test_good_arguments_reach_the_model` shows
that the same arguments, corrected, do reach the loader (the tripwire is on the path every command takes).
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.conftest import STORIES
from workbench.cli import main
from workbench.measure.sensitivity import SensitivityTable
from workbench.model.inventory import layer_inventory
from workbench.plan.plan import Plan
from workbench.transform.compare import PRESETS

TRIPWIRE = "the model was loaded before the arguments were checked"


class ModelLoaded(AssertionError):
    pass


@pytest.fixture
def no_model(monkeypatch):
    """Every way a command loads a model raises ModelLoaded."""
    import workbench.model.loading
    import workbench.runtime.serialize
    import workbench.streaming.open

    def tripwire(*args, **kwargs):
        raise ModelLoaded(TRIPWIRE)

    monkeypatch.setattr(workbench.model.loading, "load_model", tripwire)
    monkeypatch.setattr(workbench.runtime.serialize, "load_quantized", tripwire)
    monkeypatch.setattr(workbench.streaming.open, "open_streamed", tripwire)


@pytest.fixture
def files(tmp_path, stories):
    """Paths the cases refer to: a valid plan, a plan with transforms, a sensitivity table of stories260K,
    a file that is not JSON, a folder."""
    layers = layer_inventory(stories.model)
    cost = {x.name: {"int4_g128": 1.0, "int8_ch": 0.1} for x in layers}
    model = {"source": str(STORIES), "fingerprint": stories.description.fingerprint}
    SensitivityTable("proxy", ["int4_g128", "int8_ch"], layers, cost, model).save(tmp_path / "sens.json")
    Plan(default="int4_g128").save(tmp_path / "plan.json")
    Plan(default="bf16", transforms=PRESETS["hadamard residual + down"]).save(tmp_path / "rotated.json")
    (tmp_path / "broken.json").write_text('{"format": "workbench.plan",\n  "version": 1,,}')
    (tmp_path / "folder").mkdir()
    return tmp_path


M = ["--model", str(STORIES)]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")

# (argv with {d} for the files folder, what stderr must name)
BAD = {
    "generate-mode": (["generate", *M, "--prompt", "hi", "--mode", "fast"], "--mode 'fast'"),
    "generate-path": (["generate", *M, "--prompt", "hi", "--path", "gpu"], "--path 'gpu'"),
    "generate-tokens": (["generate", *M, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    "generate-plan-missing": (
        ["generate", *M, "--prompt", "hi", "--plan", "{d}/nope.json"],
        "nope.json not found",
    ),
    "generate-plan-json": (
        ["generate", *M, "--prompt", "hi", "--plan", "{d}/broken.json"],
        "invalid JSON at line 2",
    ),
    "generate-device": (["generate", *M, "--prompt", "hi", "--device", "tpu"], "unknown device 'tpu'"),
    "sensitivity-spec": (
        ["sensitivity", *M, "--specs", "int4_g128,int4_g7", "--out", "{d}/s.json"],
        "int4_g7",
    ),
    "sensitivity-seq-len": (["sensitivity", *M, "--seq-len", "0", "--out", "{d}/s.json"], "--seq-len 0"),
    "sensitivity-text": (
        ["sensitivity", *M, "--text", "{d}/no.txt", "--out", "{d}/s.json"],
        "--text: text source",
    ),
    "sensitivity-out-folder": (["sensitivity", *M, "--out", "{d}/folder"], "--out {d}/folder is a folder"),
    "sensitivity-out-not-a-table": (
        ["sensitivity", *M, "--out", "{d}/broken.json"],
        "broken.json: invalid JSON",
    ),
    "sensitivity-importance-spec": (
        ["sensitivity", *M, "--importance-spec", "int5_zz", "--out", "{d}/s.json"],
        "--importance-spec",
    ),
    "sensitivity-stream-method": (
        ["sensitivity", *M, "--stream", "--method", "kl", "--out", "{d}/s.json"],
        "--stream scans with --method proxy",
    ),
    "inspect-spec": (["inspect", *M, "--specs", "int4_g128,nf9", "--out", "{d}/o"], "--specs"),
    "inspect-tokens": (["inspect", *M, "--tokens", "0", "--out", "{d}/o"], "--tokens 0"),
    "inspect-out-file": (["inspect", *M, "--out", "{d}/plan.json"], "--out {d}/plan.json is a file"),
    "inspect-out-under-file": (
        ["inspect", *M, "--out", "{d}/plan.json/x"],
        "plan.json is a file, so no folder",
    ),
    "inspect-text": (["inspect", *M, "--text", "nosuchcorpus", "--out", "{d}/o"], "'nosuchcorpus' not found"),
    "inspect-device-auto": (
        ["inspect", *M, "--mode", "layerwise", "--device", "auto", "--out", "{d}/o"],
        "auto",
    ),
    "eval-plan": (["eval", *M, "--plan", "{d}/nope.json"], "nope.json not found"),
    "eval-tokens": (["eval", *M, "--tokens", "-5"], "--tokens -5"),
    "eval-text": (["eval", *M, "--text", "{d}/folder"], "is a folder, not a text file"),
    "eval-calib": (["eval", *M, "--plan", "{d}/plan.json", "--calib", "{d}/no.txt"], "--calib: text source"),
    "quantize-plan-json": (["quantize", *M, "--plan", "{d}/broken.json", "--out", "{d}/q"], "invalid JSON"),
    "quantize-out": (["quantize", *M, "--plan", "{d}/plan.json", "--out", "{d}/plan.json"], "is a file"),
    "quantize-tokens": (
        ["quantize", *M, "--plan", "{d}/plan.json", "--out", "{d}/q", "--tokens", "0"],
        "--tokens 0",
    ),
    "export-out": (
        ["export", *M, "--plan", "{d}/plan.json", "--format", "gguf", "--out", "{d}/folder"],
        "is a folder",
    ),
    "export-calib": (
        ["export", *M, "--plan", "{d}/plan.json", "--format", "compressed-tensors", "--out", "{d}/ct"]
        + ["--calib", "{d}/no.txt"],
        "--calib: text source",
    ),
    "outliers-seqs": (["outliers", *M, "--plan", "{d}/rotated.json", "--seqs", "0"], "--seqs 0"),
    "outliers-plan": (["outliers", *M, "--plan", "{d}/plan.json"], "has no 'transforms'"),
    "act-allocate-candidate": (
        ["act-allocate", *M, "--budget", "6", "--candidates", "int4_g128@int9_tok", "--out", "{d}/p.json"],
        "--candidates: candidate 'int4_g128@int9_tok'",
    ),
    "act-allocate-budget": (["act-allocate", *M, "--budget", "0", "--out", "{d}/p.json"], "--budget 0.0"),
    "act-allocate-transforms": (
        ["act-allocate", *M, "--budget", "6", "--transforms", "none,spin", "--out", "{d}/p.json"],
        "unknown set(s) ['spin']",
    ),
    "allocate-verify-text": (
        [
            "allocate",
            "--sensitivity",
            "{d}/sens.json",
            "--budget-bits",
            "6",
            "--out",
            "{d}/p.json",
            "--verify",
        ]
        + ["--verify-text", "{d}/no.txt"],
        "--verify-text: text source",
    ),
    "allocate-verify-tokens": (
        [
            "allocate",
            "--sensitivity",
            "{d}/sens.json",
            "--budget-bits",
            "6",
            "--out",
            "{d}/p.json",
            "--verify",
        ]
        + ["--verify-tokens", "0"],
        "--verify-tokens 0",
    ),
    "allocate-refine": (
        ["allocate", "--sensitivity", "{d}/sens.json", "--budget-bits", "6", "--out", "{d}/p.json"]
        + ["--refine", "-1"],
        "--refine -1",
    ),
}
CUDA_BAD = {
    "generate-cuda": (
        ["generate", *M, "--prompt", "hi", "--device", "cuda"],
        "--device cuda: no CUDA device",
    ),
    "quantize-cuda": (
        ["quantize", *M, "--plan", "{d}/plan.json", "--out", "{d}/q", "--device", "cuda"],
        "--device cuda: no CUDA device",
    ),
    "inspect-cuda": (
        ["inspect", *M, "--mode", "layerwise", "--device", "cuda", "--out", "{d}/o"],
        "--device cuda: no CUDA device",
    ),
    "sensitivity-stream-cuda": (
        ["sensitivity", *M, "--stream", "--method", "proxy", "--device", "cuda", "--out", "{d}/s.json"],
        "--device cuda: no CUDA device",
    ),
}
# the same commands with every argument valid: they must get as far as loading the model
GOOD = {
    "generate": ["generate", *M, "--prompt", "hi", "--plan", "{d}/plan.json"],
    "sensitivity": ["sensitivity", *M, "--specs", "int4_g128,int8_ch", "--out", "{d}/s.json"],
    "sensitivity-stream": ["sensitivity", *M, "--stream", "--method", "proxy", "--out", "{d}/s.json"],
    "inspect": ["inspect", *M, "--out", "{d}/o"],
    "eval": ["eval", *M, "--plan", "{d}/plan.json"],
    "quantize": ["quantize", *M, "--plan", "{d}/plan.json", "--out", "{d}/q", "--device", "cpu"],
    "export": ["export", *M, "--plan", "{d}/plan.json", "--format", "compressed-tensors", "--out", "{d}/ct"],
    "outliers": ["outliers", *M, "--plan", "{d}/rotated.json"],
    "act-allocate": ["act-allocate", *M, "--budget", "6", "--out", "{d}/p.json"],
    "allocate-verify": [
        "allocate",
        "--sensitivity",
        "{d}/sens.json",
        "--budget-bits",
        "6",
        "--out",
        "{d}/p.json",
    ]
    + ["--verify", "--verify-text", "wikitext2"],
}


def _argv(argv: list[str], d) -> list[str]:
    return [a.replace("{d}", str(d)) for a in argv]


def _fails_before_loading(argv, expected, files, capsys) -> None:
    t0 = time.perf_counter()
    assert main(_argv(argv, files)) == 2
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert expected.replace("{d}", str(files)) in err, err
    assert len(err.splitlines()) == 1 and err.startswith(f"workbench {argv[0]}: error: "), err
    assert seconds < 5, f"{argv[0]} took {seconds:.1f} s to refuse its arguments"


@pytest.mark.parametrize("argv, expected", list(BAD.values()), ids=list(BAD))
def test_bad_arguments_fail_before_the_model_loads(no_model, files, capsys, argv, expected):
    _fails_before_loading(argv, expected, files, capsys)


@NO_CUDA
@pytest.mark.parametrize("argv, expected", list(CUDA_BAD.values()), ids=list(CUDA_BAD))
def test_cuda_without_a_gpu_fails_before_the_model_loads(no_model, files, capsys, argv, expected):
    _fails_before_loading(argv, expected, files, capsys)


@pytest.mark.parametrize("argv", list(GOOD.values()), ids=list(GOOD))
def test_good_arguments_reach_the_model(no_model, files, argv):
    with pytest.raises(ModelLoaded, match=TRIPWIRE):
        main(_argv(argv, files))
