"""Text sources and token batches for calibration and evaluation.

A text source is a file path, a short name (`wikitext2`, `wikitext2-raw`, `wiki`, `c4`, `tinystories`,
`ptb`), optionally with a split (`wikitext2:valid`), or `hf:<dataset>[:<config>[:<split>[:<max_docs>]]]` for
a Hugging Face dataset (online only). A name resolves, in order, to:
1. the copy shipped inside the package (`workbench/textdata/`, xz-compressed; see its README for sources
   and licences): what the defaults of the CLI and the app use;
2. the data folder (`WORKBENCH_DATA`, default `../shared/data`);
3. the standard Hugging Face dataset it comes from (`HF_SOURCES`), loaded with the `datasets` library when
   online; offline this fails with a one-line message naming the three places looked at.

Evaluation follows docs/DESIGN.md: documents joined with "\\n\\n", tokenized once, cut into non-overlapping
windows of the sequence length. Calibration draws `n` windows of `seq_len` tokens at seeded random offsets.
"""

from __future__ import annotations

import hashlib
import lzma
import weakref
from collections import OrderedDict
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.paths import PACKAGE_DATA, data_dir

# name -> {split: relative path}; the first split listed is the default
NAMED_SOURCES: dict[str, dict[str, str]] = {
    "wikitext2": {"test": "wikitext-2/test.txt", "valid": "wikitext-2/valid.txt"},
    "wikitext2-raw": {"test": "wikitext-2-raw/wiki.test.raw.hf-rows"},
    "ptb": {"test": "ptb/test.txt", "valid": "ptb/valid.txt"},
    "c4": {"train": "calibration/c4.txt"},
    "tinystories": {"train": "calibration/tinystories.txt"},
    "wiki": {"train": "calibration/wiki.txt"},
}

# name -> {split: hf: source} used when neither the package nor the data folder has the file. The
# calibration samples are the first documents of very large corpora (streamed, never downloaded whole).
HF_SOURCES: dict[str, dict[str, str]] = {
    "wikitext2": {"test": "hf:wikitext:wikitext-2-v1:test", "valid": "hf:wikitext:wikitext-2-v1:validation"},
    "wikitext2-raw": {"test": "hf:wikitext:wikitext-2-raw-v1:test"},
    "ptb": {
        "test": "hf:ptb_text_only:penn_treebank:test",
        "valid": "hf:ptb_text_only:penn_treebank:validation",
    },
    "c4": {"train": "hf:allenai/c4:en:validation:3000"},
    "tinystories": {"train": "hf:roneneldan/TinyStories::train:300"},
    "wiki": {"train": "hf:wikimedia/wikipedia:20231101.en:train:500"},
}


def _named_source(name: str, split: str, source: str) -> Path | str:
    """The package copy, else the data-folder file, else the `hf:` form of a named source."""
    rel = NAMED_SOURCES[name][split]
    packaged = PACKAGE_DATA / f"{rel}.xz"
    if packaged.is_file():
        return packaged
    root = data_dir()
    if root is not None and (root / rel).is_file():
        return root / rel
    hf = HF_SOURCES.get(name, {}).get(split)
    if hf is None:
        where = f"{root / rel} is missing" if root is not None else "no data folder (set WORKBENCH_DATA)"
        raise WorkbenchError(f"text source '{source}': not in the package and {where}")
    return hf


def resolve_text_source(source: str) -> Path | str:
    """Turn a source string into a file path (`.xz` for the package copies) or an `hf:` id.

    Raises WorkbenchError when the source is unknown; never touches the network.
    """
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
        return _named_source(name, split, source)
    known = ", ".join(NAMED_SOURCES)
    raise WorkbenchError(
        f"text source '{source}' not found: not a file, not one of {known}, not hf:<dataset>"
    )


def _load_hf_dataset(spec: str, source: str) -> str:
    """Documents of `hf:<dataset>[:<config>[:<split>[:<max_docs>]]]` joined with blank lines (online only)."""
    parts = spec[3:].split(":")
    name, config = parts[0], parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "test"
    max_docs = int(parts[3]) if len(parts) > 3 and parts[3] else None
    named = source != spec
    where = f"text source '{source}' is neither in the package nor in the data folder (WORKBENCH_DATA); "
    try:
        import datasets
    except ImportError:
        lead = where if named else f"dataset '{spec}': "
        raise WorkbenchError(
            f"{lead}loading {spec} needs the `datasets` package (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=max_docs is not None)
        rows = list(ds.take(max_docs)) if max_docs is not None else ds
        column = "text" if "text" in (rows[0] if max_docs else ds.column_names) else "sentence"
        docs = [row[column] for row in rows] if max_docs is not None else ds[column]
    except Exception as exc:
        lead = where if named else f"dataset '{spec}': "
        raise WorkbenchError(f"{lead}could not load {spec} ({type(exc).__name__}); offline?") from None
    return "\n\n".join(d for d in docs if d.strip())


def _read_text_file(path: Path) -> str:
    """UTF-8 text of a file, decompressed when it ends in `.xz`."""
    raw = path.read_bytes()
    if path.suffix == ".xz":
        raw = lzma.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WorkbenchError(f"text file {path} is not UTF-8 (bad byte at offset {exc.start})") from None


def load_text(source: str) -> str:
    """The text of a source. `.hf-rows` files hold one document per line, joined with blank lines."""
    path = resolve_text_source(source)
    if isinstance(path, str):
        return _load_hf_dataset(path, source)
    text = _read_text_file(path)
    if path.name.removesuffix(".xz").endswith(".hf-rows"):
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


DEFAULT_SEQ_LEN = 512


def default_seq_len(max_context: int | None, longest: int = DEFAULT_SEQ_LEN) -> int:
    """The window length used where none is given: min(`longest`, the model's context)."""
    return min(longest, max_context) if max_context else longest


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
