"""Layer-by-layer calibration: one decoder block at a time, so only one block's weights sit on the device.

The inputs of block 0 are captured with the GPTQ "Catcher" pattern (https://arxiv.org/abs/2210.17323,
IST-DASLab/gptq): a forward pre-hook on block 0 records its positional and keyword arguments (hidden states,
attention mask, position ids, rotary position embeddings, ... whatever this transformers version passes)
and raises a private exception that stops the forward. Then, for each block in order: move it to the
device, run it on every batch with the recorded keyword arguments while the statistics hooks watch its
linears, keep its outputs as the next block's inputs, move it back. The final norm and the output head run
last. Memory: the model's non-block modules, one block, and the hidden states of all calibration
sequences [n_seqs, seq_len, hidden] in the model dtype (that last part grows with the number of tokens, as
in every GPTQ implementation; the full mode has no such term).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager

import torch

from workbench.errors import WorkbenchError
from workbench.progress import Progress
from workbench.stats.accumulator import ActivationStats
from workbench.stats.collector import ActivationCollector, GramSink, progress_bar


class _StopForward(Exception):
    """Raised by the catcher hook once block 0's inputs are recorded."""


def decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The (name, ModuleList) of decoder blocks: the ModuleList holding the most parameters."""
    best, best_n = None, -1
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise WorkbenchError(f"{type(model).__name__} has no list of decoder blocks: use mode='full'")
    return best


def final_norm(model: torch.nn.Module, blocks_name: str) -> torch.nn.Module | None:
    """The norm applied after the last block (Llama `model.norm`, GPT-2 `transformer.ln_f`, ...)."""
    base = model.get_submodule(blocks_name.rsplit(".", 1)[0]) if "." in blocks_name else model
    for attr in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        mod = getattr(base, attr, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    return None


def _to(obj, device):
    """Move tensors inside nested tuples/lists/dicts to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _device_of(mod: torch.nn.Module) -> torch.device:
    p = next(mod.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


BlockVisit = Callable[[int, torch.nn.Module], AbstractContextManager]


def move_visit(device: torch.device) -> BlockVisit:
    """The default block visit: move block i to `device` for its pass, back to where it was after."""

    @contextmanager
    def visit(i: int, block: torch.nn.Module):
        home = _device_of(block)
        block.to(device)
        try:
            yield
        finally:
            block.to(home)

    return visit


@torch.no_grad()
def _capture_block0(model, blocks, batches, batch_size, device) -> list[tuple[torch.Tensor, dict]]:
    """Run the model up to block 0 for every batch; return [(hidden [b, L, H], kwargs)] per batch."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def catcher(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.append((hidden, kwargs))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for s0 in range(0, batches.shape[0], batch_size):
            try:
                model(input_ids=batches[s0 : s0 + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise WorkbenchError(f"{type(model).__name__}: the forward never reached decoder block 0")
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def collect_layerwise(
    model: torch.nn.Module,
    batches: torch.Tensor,
    names: list[str],
    *,
    gram: bool,
    batch_size: int,
    device: torch.device,
    progress: Progress,
    gram_sink: GramSink | None,
    hist_bins: int = 256,
    visit: BlockVisit | None = None,
) -> dict[str, ActivationStats]:
    """Layer-by-layer version of `collect_activation_stats` (same arguments, same results).

    `visit(i, block)` is the context manager around block i's pass (default `move_visit(device)`); the
    statistics of block i's layers are finished (and handed to `gram_sink`) inside it, so a visit may still
    read them and the block's weights on exit (workbench.streaming materializes blocks from disk this way).
    """
    visit = visit or move_visit(device)
    blocks_name, blocks = decoder_blocks(model)
    block_names = [f"{blocks_name}.{i}." for i in range(len(blocks))]
    per_block = [[n for n in names if n.startswith(p)] for p in block_names]
    tail = [n for n in names if not any(n.startswith(p) for p in block_names)]
    norm = final_norm(model, blocks_name)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name in tail:
        if head is None or model.get_submodule(name) is not head:
            raise WorkbenchError(
                f"layer '{name}' is outside the decoder blocks and is not the output head: "
                "layerwise mode cannot feed it; use mode='full'"
            )

    # everything except the blocks goes to the device for the capture and the tail
    inside = {id(m) for m in blocks.modules()}
    moved: list[tuple[torch.nn.Module, torch.device]] = []
    for mod in model.modules():
        own = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        if own and id(mod) not in inside and own[0].device != device:
            moved.append((mod, own[0].device))
            mod.to(device)
    try:
        hidden = _capture_block0(model, blocks, batches, batch_size, device)
        starts = list(range(0, batches.shape[0], batch_size))
        with (
            ActivationCollector(model, names, gram=gram, hist_bins=hist_bins) as col,
            progress_bar(len(blocks) * len(hidden), "blocks", progress) as bar,
        ):
            for i, block in enumerate(blocks):
                with visit(i, block):
                    for j, (h, kwargs) in enumerate(hidden):
                        col.set_tokens(batches[starts[j] : starts[j] + h.shape[0]], starts[j])
                        out = block(h, **kwargs)
                        hidden[j] = (out[0] if isinstance(out, (tuple, list)) else out, kwargs)
                        bar.update(1)
                    col.finish(per_block[i], gram_sink)
            for j, (h, _) in enumerate(hidden):
                col.set_tokens(batches[starts[j] : starts[j] + h.shape[0]], starts[j])
                h = norm(h) if norm is not None else h
                for name in tail:  # the output head reads the normed last hidden state
                    model.get_submodule(name)(h)
            col.remove_hooks()
            col.finish(tail, gram_sink)
    finally:
        for mod, home in moved:
            mod.to(home)
    return {n: col.finished[n] for n in names}
