"""Streaming runs sharded with torch.distributed (issue 18): 2 gloo processes on stories260K (sharded
safetensors) merge into the very table and statistics a single process computes; a second pass resumes
(nothing recomputed)."""

from __future__ import annotations

import pytest
import torch

SPECS = ["int4_g32", "int3_g32:gptq"]


def _worker(rank: int, world: int, folder: str, ids: torch.Tensor, out: str) -> None:
    """One rank: scan then inspect, both merged by rank 0 (runs in a spawned process)."""
    from pathlib import Path

    import torch.distributed as dist

    from workbench.streaming.distributed import distributed_inspect, distributed_scan, init_distributed
    from workbench.streaming.skeleton import StreamedModel
    from workbench.streaming.source import SafetensorsSource

    torch.set_num_threads(1)
    init_distributed("gloo", f"file://{out}/pg", rank=rank, world=world)
    try:
        sm = StreamedModel(SafetensorsSource(folder))
        mine = Path(out) / f"scan.rank{rank}-of-{world}.json"
        for attempt in range(2):  # the second pass resumes: both shards are found finished
            stamp = mine.stat().st_mtime_ns if attempt else None
            _, rep = distributed_scan(
                sm, ids, SPECS, Path(out) / "scan.json", settings={"calib": "t"}, progress=False
            )
            _, irep = distributed_inspect(sm, ids, Path(out) / "insp", gram=True, progress=False)
            if attempt:
                assert mine.stat().st_mtime_ns == stamp and rep.n_layers == 0 and irep is None, "recomputed"
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(stories, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    stories.model.save_pretrained(str(folder), max_shard_size="300KB")
    return folder


def test_two_gloo_ranks_merge_to_the_single_process_result(stories, sharded, tmp_path):
    import torch.multiprocessing as mp

    from workbench.measure.sensitivity import SensitivityTable
    from workbench.model.data import calibration_batches
    from workbench.stats.inspection import Inspection
    from workbench.streaming.runs import stream_inspect, stream_proxy_scan
    from workbench.streaming.skeleton import StreamedModel
    from workbench.streaming.source import SafetensorsSource

    ids = calibration_batches(
        stories.tokenizer, "wiki", 2, 64, 0, max_context=stories.description.max_context
    )
    mp.spawn(_worker, args=(2, str(sharded), ids, str(tmp_path)), nprocs=2, join=True)

    sm = StreamedModel(SafetensorsSource(sharded))
    single, _ = stream_proxy_scan(sm, ids, SPECS, settings={"calib": "t"}, progress=False)
    merged = SensitivityTable.load(tmp_path / "scan.json")
    assert [x.name for x in merged.layers] == [x.name for x in single.layers]
    assert merged.cost == single.cost  # same math on the same inputs: exactly equal
    shard0 = SensitivityTable.load(tmp_path / "scan.rank0-of-2.json")
    assert {x.block for x in shard0.layers} == {0, 2, 4} and len(shard0.layers) < len(single.layers)

    ref, _ = stream_inspect(sm, ids, gram=True, progress=False)
    got = Inspection.load(tmp_path / "insp")
    assert list(got.activations) == list(ref.activations)
    for name, a in ref.activations.items():
        b = got.activations[name]
        assert torch.equal(a.absmax, b.absmax) and torch.equal(a.gram, b.gram), name
        assert torch.equal(a.hist_counts, b.hist_counts) and b.shared_with == a.shared_with, name
        assert got.weights[name].kurtosis == ref.weights[name].kurtosis
