"""Text sources and token batches for calibration and evaluation.

A text source is a file path, a short name resolved inside the data folder (`WORKBENCH_DATA`, default
`../shared/data`), optionally with a split (`wikitext2:valid`), or `hf:<dataset>[:<config>[:<split>]]` for a
Hugging Face dataset (online only).

Evaluation follows DESIGN.md: documents joined with "\\n\\n", tokenized once, cut into non-overlapping
windows of the sequence length. Calibration draws `n` windows of `seq_len` tokens at seeded random offsets.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.paths import data_dir

# name -> {split: relative path}; the first split listed is the default
NAMED_SOURCES: dict[str, dict[str, str]] = {
    "wikitext2": {"test": "wikitext-2/test.txt", "valid": "wikitext-2/valid.txt"},
    "wikitext2-raw": {"test": "wikitext-2-raw/wiki.test.raw.hf-rows"},
    "ptb": {"test": "ptb/test.txt", "valid": "ptb/valid.txt"},
    "c4": {"train": "calibration/c4.txt"},
    "tinystories": {"train": "calibration/tinystories.txt"},
    "wiki": {"train": "calibration/wiki.txt"},
}


def resolve_text_source(source: str) -> Path | str:
    """Turn a source string into a file path (or keep an `hf:` id). Raises WorkbenchError when unknown."""
    if source.startswith("hf:"):
        return source
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            raise WorkbenchError(f"text source {path} is a folder, not a text file")
        return path
    name, _, split = source.partition(":")
    if name in NAMED_SOURCES:
        splits = NAMED_SOURCES[name]
        split = split or next(iter(splits))
        if split not in splits:
            raise WorkbenchError(f"text source '{name}' has no split '{split}' (have: {', '.join(splits)})")
        root = data_dir()
        if root is None:
            raise WorkbenchError(f"text source '{source}' needs the data folder: set WORKBENCH_DATA")
        path = root / splits[split]
        if not path.is_file():
            raise WorkbenchError(f"text source '{source}': {path} is missing")
        return path
    known = ", ".join(NAMED_SOURCES)
    raise WorkbenchError(
        f"text source '{source}' not found: not a file, not one of {known}, not hf:<dataset>"
    )


def _load_hf_dataset(spec: str) -> str:
    parts = spec[3:].split(":")
    name, config = parts[0], parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 else "test"
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise WorkbenchError(
            f"dataset '{spec}': could not load it ({type(exc).__name__}); offline?"
        ) from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(ds[column])


def load_text(source: str) -> str:
    """The text of a source. `.hf-rows` files hold one document per line, joined with blank lines."""
    path = resolve_text_source(source)
    if isinstance(path, str):
        return _load_hf_dataset(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WorkbenchError(f"text file {path} is not UTF-8 (bad byte at offset {exc.start})") from None
    if path.name.endswith(".hf-rows"):
        text = "\n\n".join(line for line in text.split("\n") if line.strip())
    if not text.strip():
        raise WorkbenchError(f"text file {path} is empty")
    return text


# tokenizer -> {sha1 of text: ids}: entries die with their tokenizer (no reused id() can return another
# tokenizer's tokens) and each tokenizer remembers its TOKEN_CACHE_TEXTS most recently used texts.
_TOKEN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
TOKEN_CACHE_TEXTS = 8


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize once (BOS first when the tokenizer has one). Returns a LongTensor [T].

    Memoized per (tokenizer object, text) for the last TOKEN_CACHE_TEXTS texts of each live tokenizer.
    """
    digest = hashlib.sha1(text.encode()).hexdigest()
    try:
        memo = _TOKEN_CACHE.setdefault(tokenizer, OrderedDict())
    except TypeError:  # not weak-referenceable or not hashable: no memo
        memo = OrderedDict()
    if digest in memo:
        memo.move_to_end(digest)
        return memo[digest]
    ids = torch.tensor(tokenizer.encode(text, add_bos=True), dtype=torch.long)
    memo[digest] = ids
    while len(memo) > TOKEN_CACHE_TEXTS:
        memo.popitem(last=False)
    return ids


def _check_seq_len(seq_len: int, max_context: int | None) -> None:
    if seq_len < 2:
        raise WorkbenchError(f"sequence length {seq_len} is too short (need at least 2 tokens)")
    if max_context and seq_len > max_context:
        raise WorkbenchError(f"sequence length {seq_len} is larger than the model's context ({max_context})")


def eval_windows(
    tokenizer, source: str, seq_len: int, max_tokens: int | None = None, max_context: int | None = None
) -> torch.Tensor:
    """Non-overlapping evaluation windows [n, seq_len] from the start of the tokenized text.

    Args:
        max_tokens: use at most this many tokens (whole windows only).
        max_context: the model's context; a longer `seq_len` is an error.
    """
    _check_seq_len(seq_len, max_context)
    ids = tokenize_text(tokenizer, load_text(source))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n == 0:
        raise WorkbenchError(
            f"text source '{source}' has {ids.numel()} tokens, fewer than one window of {seq_len}"
        )
    return ids[: n * seq_len].view(n, seq_len)


def calibration_batches(
    tokenizer, source: str, n_seqs: int, seq_len: int, seed: int = 0, max_context: int | None = None
) -> torch.Tensor:
    """`n_seqs` windows of `seq_len` tokens at seeded random offsets: LongTensor [n_seqs, seq_len].

    The same (text, n_seqs, seq_len, seed) always gives the same batch. When the text is shorter than
    n_seqs * seq_len the windows overlap.
    """
    _check_seq_len(seq_len, max_context)
    if n_seqs < 1:
        raise WorkbenchError(f"number of calibration sequences must be >= 1 (got {n_seqs})")
    ids = tokenize_text(tokenizer, load_text(source))
    if ids.numel() < seq_len + 1:
        raise WorkbenchError(f"text source '{source}' has {ids.numel()} tokens, fewer than {seq_len + 1}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_seqs,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
