"""How far bf16 arithmetic alone moves a W8A8 model (issue 16): the plan's CPU simulation in bf16 vs fp32.

The CUDA test of apply_plan's W8A8 layers once compared the bf16 GPU model with the fp32 CPU simulation by
max |dlogit| and failed for FP8 (0.836 > 0.5). This script measures, on the CPU and without any kernel,
what that comparison measures: the same simulated plan run in bf16 and in fp32. bf16 rounding upstream moves
values across quantizer boundaries (E4M3 has 3 mantissa bits), the flipped codes decorrelate the two runs by
about the quantization error itself, so a max |dlogit| bound against the fp32 simulation says nothing about
the kernels. It prints, for int8 and FP8 W8A8 on stories260K (32 tokens, lm_head in bf16 as in the test):
max |dlogit| bf16-sim vs fp32-sim and fp32-sim vs the fp32 model, KL of each to the fp32 model, top-1
agreement.

    python benchmarks/w8a8_bf16_noise.py                        (CPU, ~10 s)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

import workbench
from workbench.model.loading import load_model
from workbench.paths import data_dir
from workbench.plan.plan import Plan, Rule
from workbench.runtime.apply import apply_plan

PAIRS = [("int8_ch_sym", "int8_tok_sym"), ("fp8_e4m3", "fp8_e4m3_tok")]


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over positions of KL(p || q) from logits [..., V]."""
    lp, lq = p.float().log_softmax(-1), q.float().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def simulated(model, wspec: str, act: str, dtype: torch.dtype):
    """A copy of model in dtype with the plan simulated (reference backend, input fake-quantized)."""
    m = copy.deepcopy(model).to(dtype)
    plan = Plan(default=wspec, act=act, rules=[Rule("lm_head", "bf16", "none")])
    apply_plan(m, plan.resolve(m), backend="reference", warn=False)
    return m


def main() -> None:
    root = data_dir() / "models" if data_dir() else Path(workbench.__file__).parent / "models"  # shipped copy
    model = load_model(str(root / "stories260K" / "stories260K.bin"), progress=False).model
    ids = torch.tensor([[1, 200, 31, 7, 99, 4, 50, 3] * 4])
    out = {}
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        for wspec, act in PAIRS:
            s32 = simulated(model, wspec, act, torch.float32)(input_ids=ids).logits.float()
            s16 = simulated(model, wspec, act, torch.bfloat16)(input_ids=ids).logits.float()
            out[f"{wspec}+{act}"] = {
                "max_dlogit_bf16sim_vs_fp32sim": float((s16 - s32).abs().max()),
                "max_dlogit_fp32sim_vs_fp32": float((s32 - ref).abs().max()),
                "kl_fp32_to_fp32sim": kl(ref, s32),
                "kl_fp32_to_bf16sim": kl(ref, s16),
                "top1_bf16sim_vs_fp32sim": float((s16.argmax(-1) == s32.argmax(-1)).float().mean()),
            }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
