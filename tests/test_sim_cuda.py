"""The simulation paths of the quality tables (issues 16 and 17) on CUDA agree with the CPU, on stories260K.

benchmarks/bench_rotations.py and benchmarks/kv_quality.py run the model, the transforms, GPTQ, activation
and KV-cache simulation on the GPU; these tests hold that each gives the CPU's numbers (up to float32
rounding). Without CUDA they are skipped (the CPU paths are covered by test_transforms.py, test_evaluate.py,
test_kvcache.py); the lead's device run executes them.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from workbench.measure.evaluate import evaluate
from workbench.measure.simulate import calibration_grams
from workbench.plan.plan import Plan
from workbench.plan.transforms import Hadamard, Smooth
from workbench.quant.api import quantize_weight
from workbench.stats.kv import kv_statistics
from workbench.transform.apply import apply_transforms
from workbench.transform.rotate import max_logit_change

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
IDS = torch.randint(1, 512, (2, 48), generator=torch.Generator().manual_seed(0))


def on_cuda(loaded):
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).cuda())


@pytest.mark.parametrize(
    "transforms",
    [[Hadamard("residual", 0), Hadamard("down", 0)], [Smooth("re:.*", 0.5, 4, "tinystories")]],
    ids=["hadamard", "smooth"],
)
def test_transforms_on_cuda_keep_the_cpu_logits(stories, transforms):
    gpu = apply_transforms(on_cuda(stories), transforms)
    assert next(gpu.model.parameters()).is_cuda
    with torch.no_grad():
        scale = float(stories.model(input_ids=IDS).logits.abs().max())
    # the CPU original against the transformed copy on the GPU (ids moved to each model's device)
    assert max_logit_change(stories.model, gpu.model, IDS) < 2e-4 * scale
    cpu = apply_transforms(stories, transforms)
    for (n, a), (_, b) in zip(cpu.model.state_dict().items(), gpu.model.state_dict().items()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5, msg=n)


def test_gptq_on_cuda_matches_cpu(stories):
    name = "model.layers.1.mlp.down_proj"
    gram = calibration_grams(stories, [name], "tinystories", 4, 128, progress=False)[name]
    W = stories.model.get_submodule(name).weight.detach()
    cpu = quantize_weight(W, "int4_g32:gptq", gram)
    gpu = quantize_weight(W.cuda(), "int4_g32:gptq", gram.cuda(), device="cuda")
    assert gpu.codes.is_cuda and not cpu.codes.is_cuda
    assert float((gpu.codes.cpu() == cpu.codes).float().mean()) > 0.99
    err = (gpu.dequantize().cpu() - cpu.dequantize()).abs().max()
    assert float(err) <= 1.01 * float(cpu.scales.max())  # at most one code apart where they differ


def test_kv_statistics_on_cuda_match_cpu(stories, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cpu"))
    cpu = kv_statistics(stories, "tinystories", 2, 128, 0)
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "gpu"))
    gpu = kv_statistics(on_cuda(stories), "tinystories", 2, 128, 0)
    for side in ("k_pre", "k_post", "v"):
        a, b = cpu.outliers(side, 3), gpu.outliers(side, 3)
        assert [r["block"] for r in a] == [r["block"] for r in b]
        assert [r["ratio"] for r in b] == pytest.approx([r["ratio"] for r in a], rel=1e-4)


def test_evaluate_on_cuda_matches_cpu(stories, tmp_path, monkeypatch):
    """GPTQ weights, int8 inputs and a K4V4 cache, with the rotation: one table row, CPU against GPU."""
    plan = Plan(
        default="int4_g32:gptq",
        act="int8_tok_sym",
        k="int4_ch_r32",
        v="int4_tok_r32",
        transforms=[Hadamard("residual", 0), Hadamard("down", 0)],
    )
    out = {}
    for where, loaded in (("cpu", stories), ("gpu", on_cuda(stories))):
        monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / where))
        resolved = plan.resolve(loaded.model)
        rotated = apply_transforms(loaded, resolved.transforms)
        grams = calibration_grams(rotated, resolved.gram_layers, "tinystories", 4, 128, progress=False)
        out[where] = evaluate(
            loaded, resolved, "tinystories", 128, 1024, grams, progress=False, transformed=rotated
        )
    cpu, gpu = out["cpu"], out["gpu"]
    assert gpu.ref_ppl == pytest.approx(cpu.ref_ppl, rel=1e-4)
    assert cpu.kl > 1e-3  # the plan measurably changes the model
    assert gpu.kl == pytest.approx(cpu.kl, rel=0.05)
    assert gpu.ppl == pytest.approx(cpu.ppl, rel=0.01)
