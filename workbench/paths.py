"""Where the workbench keeps its cache and finds its data.

- cache: env `WORKBENCH_CACHE`, else `~/.cache/workbench` (converted models, statistics, reference logits).
- data: env `WORKBENCH_DATA`, else `../shared/data` next to the repository or the working directory: an
  optional folder of more text (`ptb`, `wikitext2:valid`) and test models; the text the defaults need is
  shipped inside the package (`workbench/textdata/`, see `workbench.model.data`).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent  # the installed `workbench/` folder
PACKAGE_DATA = PACKAGE_ROOT / "textdata"  # the shipped texts (xz), see workbench.model.data
PACKAGE_MODELS = PACKAGE_ROOT / "models"  # the shipped models (stories260K)


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder inside the workbench cache."""
    root = Path(os.environ.get("WORKBENCH_CACHE") or Path.home() / ".cache" / "workbench")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path | None:
    """The shared data folder, or None when there is none."""
    env = os.environ.get("WORKBENCH_DATA")
    if env:
        return Path(env)
    repo = PACKAGE_ROOT.parent
    for candidate in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that a crash never leaves it half-written (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
