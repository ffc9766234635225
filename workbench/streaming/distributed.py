"""Streaming runs sharded over ranks with torch.distributed (torchrun; NCCL on GPUs, gloo on CPUs).

Rank r of w does the per-layer work of the decoder blocks i with i % w == r (runs.py `shard`): Grams and
proxy costs (scan), weight and activation statistics (inspect). Every rank runs the forward of every block,
since each needs the hidden states entering its blocks; the per-layer work (statistics accumulation, Grams,
fake quantization and GPTQ of every candidate spec) is what is divided. Each rank writes its shard result
next to the output (`<out>.rank<r>-of-<w>.json`, or a folder `<out>/rank<r>-of-<w>` for an inspection),
resumable: a rerun finds a finished shard and skips it. After a barrier rank 0 merges the shards into the
one result file at `out`.

Start with `torchrun --nproc_per_node N -m workbench.cli sensitivity --stream FOLDER ...`; `init_distributed`
reads the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from workbench.errors import WorkbenchError


def init_distributed(
    backend: str | None = None,
    init_method: str | None = None,
    rank: int | None = None,
    world: int | None = None,
) -> tuple[int, int]:
    """(rank, world size): joins the process group torchrun (or the explicit arguments) describe; (0, 1)
    when there is none. Backend: NCCL when CUDA is available, else gloo."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    rank = rank if rank is not None else int(os.environ["RANK"])
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world)
    return rank, world


def rank_device(device: str) -> torch.device:
    """`device` for this rank: "cuda" becomes cuda:LOCAL_RANK under torchrun."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(device)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank}-of-{world}{out.suffix}")


def merge_tables(tables: list, layers: list) -> object:
    """One SensitivityTable over `layers` (LayerInfo, the order of the result) from shard tables of the
    same scan; refuses shards of different scans or a layer no shard holds."""
    from workbench.measure.sensitivity import SensitivityTable

    first = tables[0]
    for t in tables[1:]:
        if (t.method, t.specs, t.settings, t.model) != (
            first.method,
            first.specs,
            first.settings,
            first.model,
        ):
            raise WorkbenchError("shard tables of different scans cannot be merged")
    cost, scan = {}, 0.0
    for t in tables:
        cost.update(t.cost)
        scan = max(scan, float(t.timing.get("scan", 0.0)))
    missing = [x.name for x in layers if x.name not in cost]
    if missing:
        raise WorkbenchError(f"no shard holds layer {missing[0]} (+{len(missing) - 1} more)")
    return SensitivityTable(
        method=first.method,
        specs=first.specs,
        layers=list(layers),
        cost={x.name: cost[x.name] for x in layers},
        model=first.model,
        settings=first.settings,
        timing={"scan": scan, "shards": len(tables)},
    )


def distributed_scan(sm, batches: torch.Tensor, specs: list[str], out: str | Path, **kwargs):
    """`runs.stream_proxy_scan` sharded over the ranks of the process group; rank 0 merges into `out`.

    Returns:
        (table, report): the merged table on rank 0, this rank's shard table elsewhere.
    """
    from workbench.measure.sensitivity import SensitivityTable
    from workbench.streaming.runs import shard_layers, stream_proxy_scan

    rank, world = init_distributed()
    out = Path(out)
    table, report = stream_proxy_scan(
        sm, batches, specs, out=shard_path(out, rank, world), shard=(rank, world), **kwargs
    )
    report.extra.update(rank=rank, world=world)
    if world == 1:
        table.save(out)
        return table, report
    _barrier()
    if rank == 0:
        shards = [SensitivityTable.load(shard_path(out, r, world)) for r in range(world)]
        table = merge_tables(shards, shard_layers(sm, None, kwargs.get("layers")))
        table.save(out)
    _barrier()
    return table, report


def merge_inspections(parts: list, layers: list[dict]):
    """One Inspection over `layers` (LayerInfo dicts, in order) from shard inspections of one run."""
    from workbench.stats.inspection import Inspection

    first = parts[0]
    weights, acts, text = {}, {}, {}
    for p in parts:
        if p.settings != first.settings or p.model.get("fingerprint") != first.model.get("fingerprint"):
            raise WorkbenchError("shard inspections of different runs cannot be merged")
        weights.update(p.weights)
        acts.update(p.activations)
        text.update(p.token_text)
    names = [x["name"] for x in layers]
    missing = [n for n in names if n not in acts]
    if missing:
        raise WorkbenchError(f"no shard holds the statistics of layer {missing[0]}")
    return Inspection(
        model=first.model,
        layers=list(layers),
        settings=first.settings,
        weights={n: weights[n] for n in names},
        activations={n: acts[n] for n in names},
        token_text=text,
    )


def distributed_inspect(sm, batches: torch.Tensor, out: str | Path, **kwargs):
    """`runs.stream_inspect` sharded over the ranks; each rank saves its shard to `out/rank<r>-of-<w>`
    (found there finished with the same settings: not recomputed), rank 0 merges into `out`.

    Returns:
        (inspection, report or None when the shard was already done): merged on rank 0, the shard elsewhere.
    """
    from workbench.stats.inspection import Inspection
    from workbench.streaming.runs import shard_layers, stream_inspect

    rank, world = init_distributed()
    out = Path(out)
    mine = out / f"rank{rank}-of-{world}"
    part = Inspection.load(mine) if mine.is_dir() else None
    report = None
    if part is None or part.model.get("fingerprint") != sm.source.fingerprint():
        part, report = stream_inspect(sm, batches, shard=(rank, world), **kwargs)
        part.save(mine)
        report.extra.update(rank=rank, world=world)
    _barrier()
    if rank == 0:
        parts = [Inspection.load(out / f"rank{r}-of-{world}") for r in range(world)]
        if any(p is None for p in parts):
            raise WorkbenchError(f"{out}: a shard inspection is missing after the barrier")
        part = merge_inspections(parts, [x.to_dict() for x in shard_layers(sm, None)])
        part.save(out)
    _barrier()
    return part, report
