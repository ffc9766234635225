"""Shared fixtures: the real models (stories260K always; the default model for tests marked slow) and the
headless Chromium of the browser tests."""

from __future__ import annotations

import os
import shutil
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


CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium (Playwright) for one test module; skipped without Playwright or Chromium."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install chromium, or set WORKBENCH_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
