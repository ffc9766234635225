"""Where `--seq-len` is not given, windows are min(512, the model's context): a 256-context model works with
the default options of `eval`, `inspect` and `sensitivity` (it used to fail with "sequence length 512 is
larger than the model's context (256)").

The 256-context model is stories260K itself with its llama2.c header saying seq_len 256 and its (unused)
rotary tables cut to 256 rows: the same trained weights, a genuinely shorter context.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from tests.conftest import STORIES
from workbench.model.data import default_seq_len


def test_default_seq_len():
    assert default_seq_len(256) == 256
    assert default_seq_len(8192) == 512
    assert default_seq_len(None) == 512
    assert default_seq_len(128, longest=256) == 128


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """stories260K rewritten as a 256-context llama2.c checkpoint (tokenizer beside it)."""
    if not STORIES.is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    raw = STORIES.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    assert vocab > 0 and seq_len == 512, "expected the shared-classifier stories260K header"
    half = dim // n_heads // 2 * 4 * seq_len  # bytes of one rotary table [seq_len, hd/2]
    body, real, imag = raw[28 : len(raw) - 2 * half], raw[-2 * half : -half], raw[-half:]
    folder = tmp_path_factory.mktemp("ctx256")
    head = struct.pack("<7i", dim, hidden, n_layers, n_heads, n_kv, vocab, 256)
    (folder / "stories256ctx.bin").write_bytes(head + body + real[: half // 2] + imag[: half // 2])
    shutil.copy(STORIES.with_name("tok512.bin"), folder / "tok512.bin")
    return folder / "stories256ctx.bin"


def _cli(capsys, *args: str) -> dict:
    """`workbench ARGS --json --quiet` in this process (as tests/test_stats_cli.py runs it): its JSON."""
    from workbench.cli import main

    capsys.readouterr()
    code = main([*args, "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return json.loads(out)


def test_eval_defaults_on_a_256_context_model(short_context, capsys):
    from workbench.measure.evaluate import evaluate
    from workbench.model.loading import load_model

    loaded = load_model(str(short_context), progress=False)
    assert loaded.description.max_context == 256
    res = evaluate(loaded, None, text="tinystories", max_tokens=2048, progress=False)
    assert (res.seq_len, res.n_windows) == (256, 8)
    assert 1.0 < res.ref_ppl < 50  # a trained model on its own kind of text
    out = _cli(capsys, "eval", "--model", str(short_context), "--text", "tinystories", "--tokens", "2048")
    assert out["seq_len"] == 256 and out["n_windows"] == 8
    assert out["ref_ppl"] == pytest.approx(res.ref_ppl, rel=1e-6)


def test_inspect_and_sensitivity_defaults_on_a_256_context_model(short_context, tmp_path, capsys):
    base = ["--model", str(short_context), "--text", "tinystories"]
    out = _cli(capsys, "inspect", *base, "--tokens", "1024", "--no-cache", "--out", str(tmp_path / "insp"))
    assert out["settings"]["seq_len"] == 256 and out["settings"]["n_seqs"] == 4
    sens = tmp_path / "sens.json"
    _cli(capsys, "sensitivity", *base, "--specs", "int4_g32", "--calib-seqs", "2", "--out", str(sens))
    settings = json.loads(sens.read_text())["settings"]
    # the CLI's defaults are the app's (workbench.defaults), fitted to the 256-token context
    assert settings["calib_seq_len"] <= 256 and settings["seq_len"] <= 256


def test_app_defaults_fit_a_short_context():
    """The app's calibration / Fisher / evaluation windows never exceed the model's context."""
    from types import SimpleNamespace

    from workbench import defaults

    big_short = SimpleNamespace(n_params=100_000_000, max_context=200)
    assert defaults.calibration_settings(big_short)["seq_len"] == 200
    assert defaults.fisher_settings(big_short)["seq_len"] == 200
    assert defaults.eval_settings(big_short)["seq_len"] == 200
    big_long = SimpleNamespace(n_params=100_000_000, max_context=8192)
    assert defaults.scan_settings(big_long)["calib_seq_len"] == 256
    assert defaults.eval_settings(big_long)["seq_len"] == 512
