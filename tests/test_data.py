"""Text sources, calibration sampling and evaluation windows."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.model.data import (
    PACKAGE_DATA,
    calibration_batches,
    eval_windows,
    load_text,
    resolve_text_source,
    tokenize_text,
)

SHIPPED = ("wikitext2", "wikitext2-raw", "wiki", "tinystories", "c4")


def test_named_sources_resolve():
    for name in SHIPPED:
        assert resolve_text_source(name).is_relative_to(PACKAGE_DATA)
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

    from workbench.model import data
    from workbench.model.llama2c import Llama2cTokenizer
    from workbench.model.tokenizer import Tokenizer
    from workbench.paths import data_dir

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


def test_shipped_text_is_the_data_folder_text(monkeypatch, tmp_path):
    """The package copies decompress to exactly the files they were made from (md5 in their README)."""
    import hashlib
    import lzma

    readme = (PACKAGE_DATA / "README.md").read_text()
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path))  # an empty data folder: only the package is left
    for name in SHIPPED:
        path = resolve_text_source(name)
        assert path.is_relative_to(PACKAGE_DATA) and path.suffix == ".xz"
        assert hashlib.md5(lzma.decompress(path.read_bytes())).hexdigest() in readme
    assert load_text("wikitext2").startswith(" \n = Robert <unk> = \n")  # v1: tokenized, <unk>
    assert load_text("wikitext2-raw").startswith(" = Robert Boulter = ")  # raw: no <unk>


def test_resolution_order_and_offline_message(monkeypatch, tmp_path):
    """Package, then WORKBENCH_DATA, then the hf: dataset; offline that fails with one clear line."""
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path))
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "test.txt").write_text(" the cat sat \n")
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "wiki.txt").write_text("a data-folder copy loses to the package\n")
    assert resolve_text_source("ptb") == tmp_path / "ptb" / "test.txt"
    assert load_text("ptb") == " the cat sat \n"
    assert resolve_text_source("wiki").is_relative_to(PACKAGE_DATA)
    assert resolve_text_source("ptb:valid") == "hf:ptb_text_only:penn_treebank:validation"
    assert resolve_text_source("wikitext2:valid") == "hf:wikitext:wikitext-2-v1:validation"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WorkbenchError, match="'ptb:valid' is neither in the package nor in the data folder"):
        load_text("ptb:valid")
