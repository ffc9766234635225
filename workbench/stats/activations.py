"""Activation statistics of every quantizable linear's input, collected with forward pre-hooks.

`collect_activation_stats(model, batches)` runs the calibration batches through the model and returns one
`ActivationStats` per layer (absmax / mean / RMS per input channel, Gram X^T X, histogram, massive tokens).
Two modes give the same numbers:
    full       one forward of the whole model per batch (the model must fit on its device)
    layerwise  embeddings first, then one decoder block at a time over all batches (layerwise.py), so only
               one block's weights need to be on the device
Layers reading the very same input tensor (q/k/v, gate/up) share one computation: a hook that receives the
tensor object the previous hook just saw reuses that layer's accumulator. Hooks are always removed, also on
an exception or KeyboardInterrupt. The calibration pattern follows IST-DASLab/gptq
(https://github.com/IST-DASLab/gptq).
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError
from workbench.progress import Progress
from workbench.stats.accumulator import ActivationStats
from workbench.stats.collector import ActivationCollector, GramSink, progress_bar, quantizable_names
from workbench.stats.layerwise import collect_layerwise

__all__ = ["ActivationCollector", "ActivationStats", "GramSink", "collect_activation_stats"]


def default_batch_size(seq_len: int, device: torch.device) -> int:
    """Sequences per forward: 1 on the CPU (bounded memory), ~16k tokens on a GPU."""
    return 1 if device.type == "cpu" else max(1, 16384 // seq_len)


@torch.no_grad()
def _collect_full(
    model, batches, names, gram, batch_size, progress, gram_sink, hist_bins
) -> dict[str, ActivationStats]:
    device = next(model.parameters()).device
    with (
        ActivationCollector(model, names, gram=gram, hist_bins=hist_bins) as col,
        progress_bar(batches.shape[0], "activations", progress) as bar,
    ):
        for s0 in range(0, batches.shape[0], batch_size):
            ids = batches[s0 : s0 + batch_size]
            col.set_tokens(ids, s0)
            model(input_ids=ids.to(device), use_cache=False)
            bar.update(ids.shape[0])
        col.remove_hooks()
        col.finish(names, gram_sink)
    return {n: col.finished[n] for n in names}


def collect_activation_stats(
    model: torch.nn.Module,
    batches: torch.Tensor,
    layers: list[str] | None = None,
    *,
    mode: str = "full",
    gram: bool = True,
    progress: Progress = True,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    gram_sink: GramSink | None = None,
    hist_bins: int = 256,
) -> dict[str, ActivationStats]:
    """Statistics of the input of every quantizable linear over calibration batches.

    Args:
        model: a transformers CausalLM in eval mode.
        batches: LongTensor [n_seqs, seq_len] of token ids.
        layers: restrict to these layer names (default: every quantizable linear).
        mode: "full" (one forward of the whole model per batch) or "layerwise" (one block at a time; the
            model may stay on the CPU while each block visits `device`).
        gram: collect X^T X [K, K].
        batch_size: sequences per forward (default: 1 on CPU, ~16k tokens per forward on GPU).
        device: layerwise only: where blocks run (default: the model's device).
        gram_sink: called as gram_sink(leader_name, gram) as soon as a Gram is complete (per block in
            layerwise mode); the Gram is then not kept in the returned statistics (bounded memory).
        hist_bins: bins of the value histogram (multiple of 4).

    Returns:
        {layer name: ActivationStats}, in inventory order; shared layers point at their leader.
    """
    if batches.dim() != 2 or batches.dtype != torch.long:
        raise WorkbenchError(
            f"calibration batches must be a LongTensor [n_seqs, seq_len], got "
            f"{batches.dtype} {tuple(batches.shape)}"
        )
    names = quantizable_names(model, layers)
    model_device = next(model.parameters()).device
    run_device = torch.device(device) if device is not None else model_device
    bs = batch_size or default_batch_size(batches.shape[1], run_device)
    if mode == "full":
        if run_device != model_device:
            raise WorkbenchError(
                f"full mode runs where the model is ({model_device}); use "
                f"mode='layerwise' to run blocks on {run_device}"
            )
        return _collect_full(model, batches, names, gram, bs, progress, gram_sink, hist_bins)
    if mode == "layerwise":
        return collect_layerwise(
            model,
            batches,
            names,
            gram=gram,
            batch_size=bs,
            device=run_device,
            progress=progress,
            gram_sink=gram_sink,
            hist_bins=hist_bins,
        )
    raise WorkbenchError(f"unknown statistics mode '{mode}' (choose full or layerwise)")
