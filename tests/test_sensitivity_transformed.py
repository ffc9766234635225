"""Transformed candidates in the sensitivity scan (workbench/measure/sensitivity_transformed.py), on
stories260K."""

from __future__ import annotations

import pytest

from workbench.errors import WorkbenchError
from workbench.measure.sensitivity_transformed import (
    allocate_candidates,
    allocate_over_transforms,
    candidate_name,
    parse_candidate,
    scan_transformed,
)
from workbench.plan.plan import Plan
from workbench.plan.transforms import Hadamard

ROT = [Hadamard("residual", 0), Hadamard("down", 0)]
CANDS = ["int4_g32@int8_tok_sym", "int8_ch_sym@int8_tok_sym", "int4_g32@int4_tok_sym"]
LAYERS = [
    f"model.layers.{b}.{m}" for b in (0, 4) for m in ("self_attn.q_proj", "mlp.down_proj", "mlp.up_proj")
]


def test_candidates_parse_and_refuse_naming_the_string():
    assert candidate_name("int4_g128_asym:rtn@int8_tok_sym") == "int4_g128@int8_tok_sym"
    assert parse_candidate("int4_g128")[1] is None
    with pytest.raises(WorkbenchError, match="candidate 'int4_g128@int9_tok'"):
        parse_candidate("int4_g128@int9_tok")
    with pytest.raises(WorkbenchError, match="quantizes nothing"):
        parse_candidate("bf16")


@pytest.fixture(scope="module")
def scans(stories):
    kw = dict(layers=LAYERS, text="tinystories", n_seqs=1, seq_len=96, progress=False)
    return scan_transformed(stories, CANDS, [], **kw), scan_transformed(stories, CANDS, ROT, **kw)


def test_scan_measures_every_candidate_in_the_expected_order(scans):
    for s in scans:
        assert sorted(x.name for x in s.table.layers) == sorted(LAYERS) and s.table.complete
        total = {c: sum(s.table.cost[n][c] for n in LAYERS) for c in CANDS}
        # more bits on either side never costs more KL: W8A8 < W4A8 < W4A4
        assert (
            total["int8_ch_sym@int8_tok_sym"]
            < total["int4_g32@int8_tok_sym"]
            < total["int4_g32@int4_tok_sym"]
        )
    assert scans[1].table.settings["transforms"][0]["kind"] == "hadamard"


def test_allocation_mixes_candidates_under_the_budget_and_round_trips(scans, stories):
    from workbench.measure.evaluate import evaluate

    a = allocate_candidates(scans[1], budget_bits=6.0, include_bf16=False)
    assert a.avg_bits <= 6.0 and set(a.choice.values()) == {
        "int8_ch_sym@int8_tok_sym",
        "int4_g32@int8_tok_sym",
    }
    back = Plan.from_json(a.plan.to_json())
    assert back.transforms == ROT and back.resolve(stories.model).acts[LAYERS[0]].fmt == "int8"
    low = allocate_candidates(scans[1], budget_bits=5.2, include_bf16=False)
    assert low.predicted_kl > a.predicted_kl  # a smaller budget predicts more loss
    best = allocate_over_transforms(list(scans), budget_bits=6.0, include_bf16=False)
    assert best.predicted_kl == min(
        allocate_candidates(s, 6.0, include_bf16=False).predicted_kl for s in scans
    )
    res = evaluate(stories, a.plan.resolve(stories.model), text="tinystories", max_tokens=512, progress=False)
    measured = res.kl
    assert 0 < measured < 10 * a.predicted_kl + 0.05  # the plan runs and its KL is of the predicted size
    with pytest.raises(WorkbenchError, match="below the smallest plan"):
        allocate_candidates(scans[1], budget_bits=4.5, include_bf16=False)


def test_cli_writes_a_plan_that_loads(tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "plan.json"
    argv = ["act-allocate", "--model", "stories260K", "--text", "tinystories", "--seq-len", "32"]
    argv += ["--candidates", "int4_g32@int8_tok_sym,int8_ch_sym@int8_tok_sym", "--transforms", "none"]
    assert main(argv + ["--budget", "6", "--out", str(out), "--json"]) == 0
    assert '"chosen": "none"' in capsys.readouterr().out
    plan = Plan.load(out)
    assert plan.act is None and {r.act for r in plan.rules} == {"int8_tok_sym", "none"}
    assert main(argv[:-2] + ["--transforms", "spin", "--budget", "6", "--out", str(out)]) == 2
