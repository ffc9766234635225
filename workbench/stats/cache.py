"""On-disk form of an inspection: arrays in safetensors, scalars in JSON, written so a crash never corrupts.

A folder holds two files:
    arrays.safetensors   every tensor (activation statistics of leader layers, weight histograms, grids)
    stats.json           every scalar, the layer list, the settings, and a commit record
                         {"write_id", "arrays_bytes"} that must match the arrays file's metadata
Each file is written to a temporary name and renamed into place (`os.replace`, atomic on POSIX); the JSON
goes last and is the commit: a run interrupted before it leaves either no JSON or the previous JSON whose
write id no longer matches the new arrays file, and `read_folder` reports a miss instead of mixing them.

The cache (`cache_dir("stats")`) keys folders by a hash of (model fingerprint, text source and its content
hash, n_seqs, seq_len, seed, statistic settings, STATS_VERSION).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import uuid
from pathlib import Path

import torch

from workbench.model.data import resolve_text_source
from workbench.paths import atomic_write_bytes, cache_dir

STATS_VERSION = 1
FORMAT_TAG = "workbench-inspection"
ARRAYS, SCALARS = "arrays.safetensors", "stats.json"


def text_identity(source: str) -> str:
    """The text source plus a hash of its file content (so an edited file is a new key)."""
    path = resolve_text_source(source)
    if isinstance(path, str):
        return path
    raw = Path(path).read_bytes()
    if Path(path).suffix == ".xz":  # the package copies: hash the text, as for the same file uncompressed
        raw = lzma.decompress(raw)
    h = hashlib.sha1(raw).hexdigest()[:16]
    return f"{source}@{h}"


def cache_key(fingerprint: str, text: str, n_seqs: int, seq_len: int, seed: int, settings: dict) -> str:
    """A short stable hash of everything the statistics depend on."""
    ident = {
        "fingerprint": fingerprint,
        "text": text_identity(text),
        "n_seqs": n_seqs,
        "seq_len": seq_len,
        "seed": seed,
        "settings": settings,
        "version": STATS_VERSION,
    }
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def cache_folder(key: str) -> Path:
    return cache_dir("stats", key)


def write_folder(folder: Path, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    """Write arrays then scalars atomically (see module docstring)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_id = uuid.uuid4().hex
    tmp = folder / f".{ARRAYS}.{os.getpid()}.tmp"
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"write_id": write_id, "format": FORMAT_TAG},
        )
        os.replace(tmp, folder / ARRAYS)
    finally:
        tmp.unlink(missing_ok=True)
    record = {
        "format": FORMAT_TAG,
        "version": STATS_VERSION,
        "write_id": write_id,
        "arrays_bytes": (folder / ARRAYS).stat().st_size,
        **scalars,
    }
    atomic_write_bytes(folder / SCALARS, json.dumps(record, indent=1).encode())


def read_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, scalars) of a complete, consistent folder; None when missing, partial or from another
    version."""
    from safetensors import safe_open

    folder = Path(folder)
    js, ar = folder / SCALARS, folder / ARRAYS
    if not (js.is_file() and ar.is_file()):
        return None
    try:
        scalars = json.loads(js.read_text())
    except (OSError, ValueError):
        return None
    if scalars.get("format") != FORMAT_TAG or scalars.get("version") != STATS_VERSION:
        return None
    if ar.stat().st_size != scalars.get("arrays_bytes"):
        return None
    try:
        with safe_open(str(ar), framework="pt") as f:
            if (f.metadata() or {}).get("write_id") != scalars.get("write_id"):
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a torn or foreign file is a cache miss, never an error
        return None
    return tensors, scalars
