"""Inspection cache: exact round trip, instant second run, and no corrupt cache after a partial write."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DATA
from workbench.stats import cache as cache_mod
from workbench.stats.cache import ARRAYS, SCALARS, read_folder, write_folder
from workbench.stats.inspection import Inspection, inspect_model


@pytest.fixture()
def wb_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def story_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("txt") / "stories.txt"
    path.write_text((DATA / "calibration" / "tinystories.txt").read_text()[:3000])
    return str(path)


def _same(a: Inspection, b: Inspection) -> None:
    ta, sa = a.to_parts()
    tb, sb = b.to_parts()
    assert sa == sb
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def test_round_trip_and_second_run_from_cache(stories, story_text, wb_cache, tmp_path):
    first = inspect_model(stories, story_text, n_seqs=3, seq_len=48, seed=2, progress=False)
    assert not first.from_cache
    assert first.activations["model.layers.0.mlp.up_proj"].gram.dtype == torch.float64
    second = inspect_model(stories, story_text, n_seqs=3, seq_len=48, seed=2, progress=False)
    assert second.from_cache
    _same(first, second)
    shared = second.activations["model.layers.0.self_attn.k_proj"]
    assert shared.shared_with == "model.layers.0.self_attn.q_proj"
    assert shared.gram is second.activations["model.layers.0.self_attn.q_proj"].gram
    assert second.summary().replace("  [from cache]", "") == first.summary()
    # an explicit folder round trip (what `workbench inspect --out` writes)
    first.save(tmp_path / "out")
    _same(first, Inspection.load(tmp_path / "out"))
    # the export hard-links the cache files instead of writing 2 copies
    assert (tmp_path / "out" / ARRAYS).stat().st_ino == (first.folder / ARRAYS).stat().st_ino
    assert (tmp_path / "out" / "summary.txt").read_text().startswith("stories260K")
    # a different seed is a different key
    other = inspect_model(stories, story_text, n_seqs=3, seq_len=48, seed=3, progress=False)
    assert not other.from_cache and other.folder != first.folder
    # without the cache nothing is stored and save() writes real files
    nocache = inspect_model(stories, story_text, n_seqs=3, seq_len=48, seed=4, progress=False, cache=False)
    assert nocache.folder is None
    nocache.save(tmp_path / "out2")
    assert Inspection.load(tmp_path / "out2").settings["seed"] == 4


def _parts():
    return {"a": torch.arange(10, dtype=torch.float64)}, {"x": 1}


def test_interrupted_json_write_leaves_no_mixed_cache(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    write_folder(folder, *_parts())
    assert read_folder(folder)[1]["x"] == 1

    def crash(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "atomic_write_bytes", crash)
    with pytest.raises(KeyboardInterrupt):  # new arrays landed, their JSON never did
        write_folder(folder, {"a": torch.zeros(10, dtype=torch.float64)}, {"x": 2})
    assert read_folder(folder) is None  # old JSON no longer matches the new arrays: a miss, not a mix


def test_interrupted_arrays_write_keeps_the_old_cache(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    write_folder(folder, *_parts())
    import safetensors.torch

    def partial(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00garbage")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", partial)
    with pytest.raises(OSError):
        write_folder(folder, {"a": torch.zeros(3)}, {"x": 2})
    tensors, scalars = read_folder(folder)
    assert scalars["x"] == 1 and torch.equal(tensors["a"], torch.arange(10, dtype=torch.float64))
    assert sorted(p.name for p in folder.iterdir()) == [ARRAYS, SCALARS]  # no temp file left


def test_truncated_or_foreign_files_are_a_miss(tmp_path):
    folder = tmp_path / "f"
    write_folder(folder, *_parts())
    data = (folder / ARRAYS).read_bytes()
    (folder / ARRAYS).write_bytes(data[: len(data) // 2])
    assert read_folder(folder) is None
    write_folder(folder, *_parts())
    (folder / SCALARS).write_text("{not json")
    assert read_folder(folder) is None
    assert read_folder(tmp_path / "missing") is None
