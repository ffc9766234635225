"""`workbench inspect` end to end on stories260K: files written, summary, JSON mode, second run from cache."""

from __future__ import annotations

import json

from tests.conftest import DATA, STORIES
from workbench.cli import main


def test_inspect_cli_writes_stats_and_uses_cache(stories, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text((DATA / "calibration" / "tinystories.txt").read_text()[:3000])
    argv = [
        "inspect",
        "--model",
        str(STORIES),
        "--text",
        str(text),
        "--tokens",
        "192",
        "--seq-len",
        "64",
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Input-channel outliers" in out and "Massive activations" in out
    first_layer = out.split("worst channels (ch: absmax)")[1].splitlines()[2].split()[0]
    assert first_layer.startswith(("model.layers.", "lm_head"))
    assert "largest k_post outlier channels" in out  # the KV-cache statistics (issue 17)
    for f in (
        "arrays.safetensors",
        "stats.json",
        "summary.txt",
        "model.json",
        "layers.json",
        "kv_stats.json",
    ):
        assert (tmp_path / "out" / f).is_file(), f
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["settings"]["n_seqs"] == 3 and stats["settings"]["seq_len"] == 64

    assert main(argv + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["from_cache"] is True
    assert len(res["outliers"]) == 10
    ratios = [r["max_ratio"] for r in res["outliers"]]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > 1
    kv_top = res["kv_outliers"]["k_post"]
    assert len(kv_top) == 5 and kv_top[0]["ratio"] >= kv_top[-1]["ratio"] > 1
    top = res["outliers"][0]
    assert top["channels"][0]["ratio"] == top["max_ratio"]


def test_inspect_cli_rejects_too_few_tokens(tmp_path, capsys):
    assert (
        main(
            [
                "inspect",
                "--model",
                str(STORIES),
                "--tokens",
                "10",
                "--seq-len",
                "64",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--tokens 10" in capsys.readouterr().err
