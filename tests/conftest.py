"""Shared fixtures: the real models (stories260K always; the default model for tests marked slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("WORKBENCH_DATA") or REPO.parent / "shared" / "data")
STORIES = DATA / "models" / "stories260K" / "stories260K.bin"
if not STORIES.is_file():  # a clone without the data folder: the copy shipped inside the package
    STORIES = REPO / "workbench" / "models" / "stories260K" / "stories260K.bin"


@pytest.fixture(scope="session")
def stories():
    """stories260K (llama2.c, 5 blocks, dim 64) converted to a transformers Llama."""
    from workbench.model.loading import load_model

    if not STORIES.is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    return load_model(str(STORIES), progress=False)


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct from the PyPI wheel (converted once, then cached)."""
    from workbench.model.loading import load_model

    return load_model("default", progress=False)
