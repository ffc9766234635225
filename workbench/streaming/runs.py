"""Streaming runs: inspection statistics, the proxy sensitivity scan and quantization of a StreamedModel.

Each run is one pass of `stats.layerwise.collect_layerwise` over the model (calibration hidden states carried
block to block, one block materialized at a time) whose per-block `after` step does the block's work while
its weights are on the device: weight statistics (inspect), proxy costs from the block's Grams (scan,
`sensitivity.proxy_costs`; on a GPU devicequant.py), or GPTQ / AWQ / RTN and one packed shard written
(quantize.py, `runtime.apply.quantize_layer`). No statistic or quantization math lives here: the same
functions as the in-memory paths run, on the same inputs, so the results are the same.

`shard=(rank, world)` restricts the per-layer work to the decoder blocks i with i % world == rank (the
forward of every block still runs on every rank: each needs the hidden states); distributed.py runs one
rank per process and merges.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.streaming.skeleton import StreamedModel, describe, host_rss_bytes

SHARED_INPUT = {"k": "q", "v": "q", "up": "gate"}  # Llama: these roles read their leader's input tensor


@dataclass
class StreamReport:
    """What one streaming run measured."""

    phase: str
    seconds: float = 0.0
    n_blocks: int = 0
    n_layers: int = 0
    peak_gpu_bytes: int | None = None  # torch.cuda.max_memory_allocated over the run
    peak_host_rss_bytes: int = 0  # ru_maxrss of the process (peak since it started)
    block_bytes: int = 0  # the largest block materialized
    block_seconds: list[float] = field(default_factory=list)  # wall time of each block's visit, in order
    after_seconds: list[float] = field(default_factory=list)  # of which the per-layer work after the pass
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def start_report(sm: StreamedModel) -> float:
    sm.block_seconds.clear()
    sm.after_seconds.clear()
    if sm.device.type == "cuda":
        torch.cuda.synchronize(sm.device)
        torch.cuda.reset_peak_memory_stats(sm.device)
    return time.perf_counter()


def finish_report(sm: StreamedModel, phase: str, t0: float, n_layers: int, **extra) -> StreamReport:
    peak = None
    if sm.device.type == "cuda":
        torch.cuda.synchronize(sm.device)
        peak = int(torch.cuda.max_memory_allocated(sm.device))
    return StreamReport(
        phase=phase,
        seconds=time.perf_counter() - t0,
        n_blocks=sm.n_blocks,
        n_layers=n_layers,
        peak_gpu_bytes=peak,
        peak_host_rss_bytes=host_rss_bytes(),
        block_bytes=sm.peak_block_bytes,
        block_seconds=[round(t, 4) for t in sm.block_seconds],
        after_seconds=[round(t, 4) for t in sm.after_seconds],
        extra=extra,
    )


def shard_blocks(n_blocks: int, shard: tuple[int, int] | None) -> set[int]:
    """The decoder blocks rank `shard[0]` of `shard[1]` works on (all blocks without a shard)."""
    if shard is None:
        return set(range(n_blocks))
    rank, world = shard
    if not 0 <= rank < world:
        raise WorkbenchError(f"shard rank {rank} is not in 0..{world - 1}")
    return {i for i in range(n_blocks) if i % world == rank}


def shard_layers(sm: StreamedModel, shard: tuple[int, int] | None, layers: list[str] | None = None):
    """LayerInfo of the quantizable layers rank `shard` owns (block i % world == rank; the output head and
    any other layer outside the blocks belongs to the last rank)."""
    from workbench.model.inventory import layer_inventory

    inv = layer_inventory(sm.model)
    if layers is not None:
        known = {x.name for x in inv}
        bad = [n for n in layers if n not in known]
        if bad:
            raise WorkbenchError(f"layer {bad[0]} is not a quantizable linear of {sm.source.name}")
        inv = [x for x in inv if x.name in set(layers)]
    mine = shard_blocks(sm.n_blocks, shard)
    last = shard is None or shard[0] == shard[1] - 1
    return [x for x in inv if (x.block in mine if x.block is not None else last)]


def gram_of(layer, grams: dict[str, torch.Tensor]) -> torch.Tensor:
    """The Gram of `layer` among the leaders handed to a gram sink (k/v read q's input, up reads gate's)."""
    if layer.name in grams:
        return grams[layer.name]
    lead_role = SHARED_INPUT.get(layer.role)
    lead = layer.name.replace(f"{layer.role}_proj", f"{lead_role}_proj") if lead_role else None
    assert lead in grams, f"no Gram for {layer.name} (nor its input leader {lead})"
    return grams[lead]


def collect_stream(
    sm: StreamedModel, batches, names, *, gram, batch_size, progress, sink, after, hist_bins=256
):
    """One layerwise pass of `names` over the model; `after(i, block)` runs before block i is freed."""
    from workbench.stats.activations import default_batch_size
    from workbench.stats.layerwise import collect_layerwise

    if batches.dim() != 2 or batches.dtype != torch.long:
        raise WorkbenchError(f"calibration batches must be a LongTensor [n, L], got {tuple(batches.shape)}")
    bs = batch_size or default_batch_size(batches.shape[1], sm.device)
    return collect_layerwise(
        sm.model,
        batches,
        names,
        gram=gram,
        batch_size=bs,
        device=sm.device,
        progress=progress,
        gram_sink=sink,
        hist_bins=hist_bins,
        visit=sm.visit_factory(after),
    )


# ---------------------------------------------------------------------- inspect
def stream_inspect(
    sm: StreamedModel,
    batches: torch.Tensor,
    *,
    settings: dict | None = None,
    specs: tuple[str, ...] | list[str] = ("int4_g128", "int8_ch"),
    k_sigma: float = 6.0,
    group_size: int = 128,
    hist_bins: int = 256,
    gram: bool = False,
    gram_pass: bool = True,
    shard: tuple[int, int] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    tokenizer=None,
):
    """Weight and activation statistics of every quantizable layer (of this shard), streaming.

    Args:
        batches: LongTensor [n, L] calibration ids.
        settings: recorded in the Inspection (text, n_seqs, seq_len, seed ... as `inspect_model` does).
        gram: keep every Gram X^T X in the statistics (host memory grows with hidden^2 per layer: off for
            70B shapes, where the Grams are still computed and handed to a sink that drops them).
        gram_pass: with gram=False, still compute every Gram (and drop it): the cost of the full pass;
            False skips them (the statistics without Grams).
    Returns:
        (Inspection, StreamReport).
    """
    from workbench.model.inventory import get_linear_weight, get_module
    from workbench.stats.inspection import Inspection
    from workbench.stats.weights import weight_stats

    mine = shard_layers(sm, shard)
    names = [x.name for x in mine]
    specs = [str(s) for s in specs]
    weights = {}

    def do_weights(layer_names):
        for n in layer_names:
            W = get_linear_weight(get_module(sm.model, n))
            weights[n] = weight_stats(W, k_sigma, name=n, group_size=group_size, specs=specs)

    per_block = sm.block_layers(names)
    t0 = start_report(sm)
    sink = None if gram or not gram_pass else (lambda name, g: None)
    acts = collect_stream(
        sm,
        batches,
        names,
        gram=gram or gram_pass,
        batch_size=batch_size,
        progress=progress,
        sink=sink,
        after=lambda i, block: do_weights(per_block[i]),
        hist_bins=hist_bins,
    )
    do_weights([x.name for x in mine if x.block is None])
    token_text = {}
    if tokenizer is not None:
        ids = sorted({int(i) for st in acts.values() for i in st.token_max.token_ids.tolist() if i >= 0})
        token_text = {i: tokenizer.decode([i]) for i in ids}
    settings = {"text": "token ids", "seed": None, **(settings or {})}
    settings.update(n_seqs=int(batches.shape[0]), seq_len=int(batches.shape[1]))
    settings.update(specs=specs, k_sigma=k_sigma, group_size=group_size, hist_bins=hist_bins, gram=gram)
    insp = Inspection(
        model=describe(sm).to_dict(),
        layers=[x.to_dict() for x in mine],
        settings=settings,
        weights={n: weights[n] for n in names},
        activations=acts,
        token_text=token_text,
    )
    return insp, finish_report(sm, "inspect", t0, len(names), tokens=int(batches.numel()))


# ---------------------------------------------------------------------- proxy scan
def stream_proxy_scan(
    sm: StreamedModel,
    batches: torch.Tensor,
    specs: list[str],
    *,
    settings: dict | None = None,
    out: str | Path | None = None,
    shard: tuple[int, int] | None = None,
    layers: list[str] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    exact: bool = False,
):
    """The proxy sensitivity table (`sensitivity.py`, method "proxy", no importance), streaming.

    On CUDA the quadratic forms run in TF32 (`devicequant.proxy_costs_tensor`); `exact=True`: float32.

    The Grams of each block are collected in its pass and scored with `sensitivity.proxy_costs` while the
    block's weights are materialized, then dropped. The table is saved to `out` after every block; a table
    already at `out` with the same identity resumes (its blocks' layers are not scored again).

    Returns:
        (SensitivityTable, StreamReport).
    """
    from workbench.measure.sensitivity import SensitivityTable, resume_scan
    from workbench.model.inventory import get_linear_weight, get_module
    from workbench.quant.spec import QuantSpec
    from workbench.streaming.devicequant import proxy_costs_here, proxy_costs_tensor

    specs = [str(QuantSpec.parse(s)) for s in specs]
    if not specs:
        raise WorkbenchError("no specs to scan")
    mine = shard_layers(sm, shard, layers)
    d = describe(sm)
    table = SensitivityTable(
        method="proxy",
        specs=specs,
        layers=mine,
        model={"fingerprint": d.fingerprint, "source": d.source, "name": d.name},
        settings={**(settings or {}), "importance": "none", "importance_spec": None},
    )
    table = resume_scan(Path(out) if out else None, table)
    todo = [x for x in mine if x.name not in table.done_layers()]
    report_t0 = start_report(sm)
    if not todo:
        return table, finish_report(sm, "scan", report_t0, 0, resumed=True)
    grams: dict[str, torch.Tensor] = {}
    by_block: dict[int | None, list] = {}
    for x in todo:
        by_block.setdefault(x.block, []).append(x)

    def score(block_layers) -> None:
        t = time.perf_counter()
        on_gpu = sm.device.type == "cuda"  # the block's costs stay on the device: one host sync per block
        costs = {}
        for x in block_layers:
            W, G = get_linear_weight(get_module(sm.model, x.name)), gram_of(x, grams).float()
            if on_gpu:
                costs[x.name] = proxy_costs_tensor(W, G, specs, x.name, exact=exact)
            else:
                costs[x.name] = proxy_costs_here(W, G, specs, name=x.name)
        if on_gpu and costs:
            values = torch.stack(list(costs.values())).tolist()
            costs = {n: dict(zip(specs, v)) for n, v in zip(costs, values)}
        table.cost.update(costs)
        table.timing["scan"] = float(table.timing.get("scan", 0.0)) + time.perf_counter() - t
        grams.clear()
        if out is not None:
            table.save(out)

    collect_stream(
        sm,
        batches,
        [x.name for x in todo],
        gram=True,
        batch_size=batch_size,
        progress=progress,
        sink=lambda name, g: grams.__setitem__(name, g),
        after=lambda i, block: score(by_block.get(i, [])),
    )
    score(by_block.get(None, []))
    return table, finish_report(sm, "scan", report_t0, len(todo), specs=specs)


def write_json(path: str | Path, obj: dict) -> None:
    from workbench.paths import atomic_write_bytes

    atomic_write_bytes(Path(path), json.dumps(obj, indent=1).encode())
