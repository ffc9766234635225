"""Text sources, calibration sampling and evaluation windows."""

from __future__ import annotations

import pytest
import torch

from workbench.data import calibration_batches, eval_windows, load_text, resolve_text_source, tokenize_text
from workbench.errors import WorkbenchError


def test_named_sources_resolve():
    for name in ("wikitext2", "wikitext2:valid", "wikitext2-raw", "ptb", "c4", "tinystories", "wiki"):
        assert resolve_text_source(name).is_file()
    with pytest.raises(WorkbenchError, match="no split"):
        resolve_text_source("ptb:train")
    with pytest.raises(WorkbenchError, match="not found"):
        resolve_text_source("no-such-text")


def test_calibration_is_deterministic(stories):
    a = calibration_batches(stories.tokenizer, "tinystories", 4, 32, seed=1)
    b = calibration_batches(stories.tokenizer, "tinystories", 4, 32, seed=1)
    c = calibration_batches(stories.tokenizer, "tinystories", 4, 32, seed=2)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_eval_windows_are_non_overlapping(stories):
    w = eval_windows(stories.tokenizer, "tinystories", 128, max_tokens=1000)
    assert w.shape == (7, 128)
    ids = stories.tokenizer.encode(load_text("tinystories"), add_bos=True)
    assert w.flatten().tolist() == ids[: 7 * 128]


def test_bad_text_files(tmp_path, stories):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(WorkbenchError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(WorkbenchError, match="not UTF-8"):
        load_text(str(tmp_path / "latin1.txt"))
    with pytest.raises(WorkbenchError, match="larger than the model's context"):
        eval_windows(stories.tokenizer, "tinystories", 1024, max_context=stories.description.max_context)


def test_token_memo_is_per_tokenizer_and_bounded():
    import gc

    from workbench import data
    from workbench.llama2c import Llama2cTokenizer
    from workbench.paths import data_dir
    from workbench.tokenizer import Tokenizer

    tok = Tokenizer(Llama2cTokenizer(data_dir() / "models" / "stories260K" / "tok512.bin"))
    texts = [f"Once upon a time there were {i} cats." for i in range(data.TOKEN_CACHE_TEXTS + 3)]
    first = tokenize_text(tok, texts[0])
    assert tokenize_text(tok, texts[0]) is first  # memoized
    for t in texts:
        assert torch.equal(tokenize_text(tok, t), torch.tensor(tok.encode(t, add_bos=True)))
    assert len(data._TOKEN_CACHE[tok]) == data.TOKEN_CACHE_TEXTS  # oldest texts dropped
    n = len(data._TOKEN_CACHE)
    del tok
    gc.collect()
    assert len(data._TOKEN_CACHE) == n - 1  # the memo died with its tokenizer
