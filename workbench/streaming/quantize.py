"""Streaming quantization: apply a plan block by block and write the packed model shard by shard.

One pass of `stats.layerwise.collect_layerwise` collects the Grams of the plan's GPTQ / AWQ layers from the
unquantized model (as `workbench quantize` does in memory: `simulate.calibration_grams`, then `apply_plan`);
while block i is materialized, each of its planned layers is quantized with `runtime.apply.quantize_layer`
and packed into a `QuantLinear`, block i's state dict is written to `blocks-{i:05d}.safetensors`, and the
block goes back to meta. The resident tensors (embedding, final norm, output head, quantized too when the
plan says so) go last to `model.safetensors`, whose header carries the manifest of
`runtime/serialize.py` plus the list of block shards: `load_quantized` reads the folder like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.streaming.runs import StreamReport, collect_stream, finish_report, start_report
from workbench.streaming.skeleton import StreamedModel


def _quantize_modules(sm: StreamedModel, names: list[str], resolved, grams: dict) -> dict:
    """Quantize the named layers in place (swapped into the model); returns {name: (manifest entry, orig)}."""
    from workbench.model.inventory import get_linear_weight, get_module
    from workbench.runtime.apply import dense_copy, layout_reason
    from workbench.runtime.qlinear import QuantLinear
    from workbench.runtime.serialize import packed_entry
    from workbench.streaming.devicequant import quantize_here
    from workbench.streaming.runs import gram_of

    info = {x.name: x for x in resolved.layers}
    done = {}
    stacked = _stacked_gptq(sm, names, resolved, grams) if sm.device.type == "cuda" else {}
    for name in names:
        mod = get_module(sm.model, name)
        W = get_linear_weight(mod)
        spec = resolved[name]
        with torch.no_grad():
            gram = gram_of(info[name], grams).to(W.device) if spec.needs_gram else None
            qw = stacked.pop(name) if name in stacked else quantize_here(name, W, spec, gram)
            if layout_reason(spec):
                new = dense_copy(mod, qw.dequantize().to(W.device, W.dtype))
                entry = None
            else:
                new = QuantLinear.from_quantized(qw, mod.bias, name=name, dtype=W.dtype, device=W.device)
                entry = packed_entry(new)
        parent_name, _, leaf = name.rpartition(".")
        parent = sm.model.get_submodule(parent_name)
        done[name] = (entry, mod)
        setattr(parent, leaf, new)
    return done


def _stacked_gptq(sm: StreamedModel, names: list[str], resolved, grams: dict) -> dict:
    """{name: QuantizedWeight} of the GPTQ layers that share one Gram and one spec, quantized together
    (`devicequant.gptq_stacked`: the GPU path; the CPU quantizes each layer alone, as apply_plan does)."""
    from workbench.model.inventory import get_linear_weight, get_module
    from workbench.streaming.devicequant import gptq_stacked
    from workbench.streaming.runs import gram_of

    info = {x.name: x for x in resolved.layers}
    groups: dict[tuple, list[str]] = {}
    for n in names:
        spec = resolved[n]
        if spec.algo == "gptq" and spec.is_int:
            groups.setdefault((id(gram_of(info[n], grams)), str(spec)), []).append(n)
    out = {}
    for group in groups.values():
        if len(group) < 2:
            continue
        Ws = [get_linear_weight(get_module(sm.model, n)) for n in group]
        gram = gram_of(info[group[0]], grams).to(Ws[0].device)
        out.update(zip(group, gptq_stacked(group, Ws, resolved[group[0]], gram)))
    return out


def _restore(sm: StreamedModel, done: dict) -> None:
    for name, (_, orig) in done.items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(sm.model.get_submodule(parent_name), leaf, orig)


def _tensors(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(`state` on the CPU with tied tensors stored once, aliases), keys under `prefix`."""
    tensors, aliases, first = {}, {}, {}
    for key, t in state.items():
        k = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if k in first:
            aliases[prefix + key] = first[k]
            continue
        first[k] = prefix + key
        tensors[prefix + key] = t.detach().contiguous().cpu()
    return tensors, aliases


def stream_quantize(
    sm: StreamedModel,
    plan,
    out: str | Path,
    batches: torch.Tensor | None = None,
    *,
    tokenizer=None,
    batch_size: int | None = None,
    write: bool = True,
    progress: bool = True,
) -> tuple[Path, StreamReport]:
    """Quantize a streamed model with `plan` and write it to the folder `out` (module docstring).

    Args:
        plan: a Plan or {layer: spec}; resolved against the streamed model's layers.
        batches: LongTensor [n, L] calibration ids for the GPTQ / AWQ layers (None: the plan has none).
        tokenizer: stored beside the weights (as `save_quantized` does).
        write: False quantizes without writing (timing runs).
    Returns:
        (folder, StreamReport).
    """
    from safetensors.torch import save_file

    from workbench.plan.plan import Plan, ResolvedPlan
    from workbench.quant.packing import LAYOUT_VERSION
    from workbench.runtime.serialize import FORMAT, WEIGHTS, save_tokenizer

    resolved = ResolvedPlan.of(sm.model, plan)
    if resolved.acts or resolved.transforms:
        raise WorkbenchError(
            "streaming quantization applies weight specs only (the plan has act specs/transforms)"
        )
    folder = Path(out)
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    quantized = resolved.quantized
    if resolved.gram_layers and batches is None:
        raise WorkbenchError(f"layer {resolved.gram_layers[0]} uses gptq/awq: calibration batches are needed")
    if batches is None:
        batches = torch.zeros(1, 2, dtype=torch.long)
    per_block = sm.block_layers(quantized)
    tail = [n for n in quantized if not n.startswith("model.layers.")]
    grams: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    shards: list[str] = []

    def do_block(i: int, block: torch.nn.Module) -> None:
        done = _quantize_modules(sm, per_block[i], resolved, grams)
        grams.clear()
        layers.update({n: e for n, (e, _) in done.items() if e is not None})
        if write:
            tensors, aliases = _tensors(block.state_dict(), f"model.layers.{i}.")
            assert not aliases, f"block {i} has tied tensors"
            name = f"blocks-{i:05d}.safetensors"
            save_file(tensors, str(folder / name))
            shards.append(name)
        _restore(sm, done)

    t0 = start_report(sm)
    collect_stream(
        sm,
        batches,
        resolved.gram_layers,
        gram=True,
        batch_size=batch_size,
        progress=progress,
        sink=lambda name, g: grams.__setitem__(name, g),
        after=do_block,
    )
    done = _quantize_modules(sm, tail, resolved, grams)
    layers.update({n: e for n, (e, _) in done.items() if e is not None})
    if write:
        state = {k: v for k, v in sm.model.state_dict().items() if not k.startswith("model.layers.")}
        tensors, aliases = _tensors(state, "")
        manifest = {
            "format": FORMAT,
            "layout_version": LAYOUT_VERSION,
            "architecture": (getattr(sm.model.config, "architectures", None) or ["LlamaForCausalLM"])[0],
            "config": sm.model.config.to_dict(),
            "dtype": str(sm.dtype).replace("torch.", ""),
            "source": str(getattr(sm.source, "folder", sm.source.name)),
            "layers": {n: layers[n] for n in resolved if n in layers},
            "aliases": aliases,
            "conv1d": [],
            "shards": shards,
            "tokenizer": save_tokenizer(tokenizer, folder),
        }
        meta = {"format": FORMAT, "layout_version": str(LAYOUT_VERSION), "manifest": json.dumps(manifest)}
        save_file(tensors, str(folder / WEIGHTS), metadata=meta)
        Plan.from_resolved(dict(resolved)).save(folder / "plan.json")
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _restore(sm, done)
    return folder, finish_report(sm, "quantize", t0, len(quantized), written=write, shards=len(shards))
