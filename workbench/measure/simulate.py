"""Simulated quantization: swap chosen layers' weights for fake-quantized ones, always restoring them.

`fake_quantized(model, resolved, grams)` is a context manager. Inside it, every layer named in `resolved`
computes with `fake_quant(W, spec, gram)` (the dequantized weight, float32 math, same dtype as before), so
any forward pass measures the plan's quality without packed kernels. Each swapped layer gets a *new*
Parameter; the old one is put back in a `finally` block, so the model is unchanged after the block even on
an exception or Ctrl-C. Replacing the Parameter (instead of writing into it) matters for a tied lm_head:
quantizing the output head must not change the input embeddings that share its storage.

`act_quantized(model, acts)` adds activation quantization (plan version 2): a forward pre-hook on each named
layer fake-quantizes its input by its ActSpec (`workbench.quant.act.fake_quant_act`), removed on exit.

GPTQ and AWQ specs need the layer's calibration Gram matrix X^T X; `calibration_grams` is the one function
that collects them (workbench.stats) for the layers asked (`ResolvedPlan.gram_layers`, or every layer for the
proxy sensitivity), cached on disk per (model fingerprint, text, n_seqs, seq_len, seed, layers).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

from workbench.errors import WorkbenchError
from workbench.model.inventory import get_linear_weight, get_module
from workbench.paths import cache_dir
from workbench.progress import Progress, track
from workbench.quant.act import ActSpec
from workbench.quant.spec import QuantSpec


def needs_gram(spec: QuantSpec | str) -> bool:
    """True when the spec's algorithm reads calibration statistics (gptq, awq): `QuantSpec.needs_gram`."""
    return QuantSpec.parse(spec).needs_gram


def set_weight(module: torch.nn.Module, W_hat: torch.Tensor) -> torch.nn.Parameter:
    """Give `module` a new weight Parameter from W_hat [out, in]; return the old Parameter."""
    old = module.weight
    data = W_hat.t() if get_linear_weight(module) is not module.weight else W_hat  # Conv1D stores [in, out]
    module.weight = torch.nn.Parameter(data.to(old.device, old.dtype).contiguous(), requires_grad=False)
    return old


def quantized_weight(
    model: torch.nn.Module,
    name: str,
    spec: QuantSpec | str,
    grams: dict[str, torch.Tensor] | None = None,
    **opts,
) -> torch.Tensor:
    """fake_quant of layer `name`'s weight [out, in] (float32), with its Gram when the spec needs one.

    On the CPU everything runs there; for a model on CUDA, GPTQ runs on the GPU (`quantize_weight`'s
    `device`: its column loop would otherwise copy every weight and Gram to the host), other specs on the
    CPU, so RTN results do not depend on where the model is."""
    from workbench.quant.api import fake_quant

    spec = QuantSpec.parse(spec)
    gram = (grams or {}).get(name)
    if needs_gram(spec) and gram is None:
        raise WorkbenchError(
            f"layer {name}: '{spec}' needs calibration statistics (Gram matrix); pass grams="
        )
    W = get_linear_weight(get_module(model, name)).detach()
    if W.is_cuda and spec.algo == "gptq" and spec.is_quantized:
        opts = {"device": W.device, **opts}  # GPTQ where the model is; RTN / AWQ on the CPU as always
    return fake_quant(W.float(), spec, gram if needs_gram(spec) else None, layer=name, **opts)


@contextlib.contextmanager
def swapped_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace layers' weights with given [out, in] tensors (always restored)."""
    saved: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
    try:
        for name, W_hat in weights.items():
            mod = get_module(model, name)
            saved.append((mod, set_weight(mod, W_hat)))
        yield
    finally:
        for mod, old in reversed(saved):
            mod.weight = old


@contextlib.contextmanager
def fake_quantized(
    model: torch.nn.Module,
    resolved: dict[str, QuantSpec | str],
    grams: dict[str, torch.Tensor] | None = None,
    *,
    progress: Progress = False,
    **opts,
) -> Iterator[dict[str, float]]:
    """Run the model with `resolved` layers fake-quantized; yields {layer: seconds spent quantizing it}.

    Args:
        resolved: {layer name: spec}; bf16/fp16 layers are rounded to that dtype.
        grams: {layer name: [K, K] Gram} for gptq/awq layers.
        opts: passed to `fake_quant` (clip, act_order, ...).
        progress: per layer (`workbench.progress`: tqdm, silent, or a fraction callback).
    """
    import time

    times: dict[str, float] = {}
    weights: dict[str, torch.Tensor] = {}
    for name, spec in track(resolved.items(), "quantize", progress, unit="layer"):
        t0 = time.perf_counter()
        weights[name] = quantized_weight(model, name, spec, grams, **opts)
        times[name] = time.perf_counter() - t0
    with swapped_weights(model, weights):
        yield times


@contextlib.contextmanager
def act_quantized(model: torch.nn.Module, acts: dict[str, ActSpec | str]) -> Iterator[None]:
    """Run the model with the inputs of `acts` layers fake-quantized per token / group (hooks always removed).

    A hook registered here runs after those already on the module (an online Hadamard before down_proj
    rotates first, then the rotated input is quantized, as a kernel would see it).
    """
    handles = []
    try:
        handles = add_act_hooks(model, acts)
        yield
    finally:
        for h in handles:
            h.remove()


def add_act_hooks(model: torch.nn.Module, acts: dict[str, ActSpec | str]) -> list:
    """Register the fake-quantizing input hooks of `acts` layers; returns their handles (`.remove()`)."""
    from workbench.quant.act import fake_quant_act

    def hook_for(spec: ActSpec):
        return lambda module, args: (fake_quant_act(args[0], spec), *args[1:])

    parsed = {name: ActSpec.parse(spec) for name, spec in acts.items()}
    return [get_module(model, n).register_forward_pre_hook(hook_for(s)) for n, s in parsed.items()]


def calibration_grams(
    loaded,
    names: list[str] | None = None,
    text: str = "wiki",
    n_seqs: int = 32,
    seq_len: int | None = None,
    seed: int = 0,
    progress: Progress = True,
    use_cache: bool = True,
) -> dict[str, torch.Tensor]:
    """Gram matrices X^T X [K, K] (float32) of the inputs of `names` (default: every quantizable linear).

    The one source of calibration inputs for GPTQ / AWQ and the proxy sensitivity. Calibration windows:
    `calibration_batches(tokenizer, text, n_seqs, seq_len, seed)`, seq_len None is min(512, the model's
    context); only the named layers are collected (memory and time grow with the layers asked). Cached in
    `cache_dir("grams")` as safetensors (key: model fingerprint and source, text, n_seqs, seq_len, seed, the
    layer names); layers sharing an input (q/k/v, gate/up) share one tensor. `use_cache=False` neither reads
    nor writes the cache (8B-sized models).
    """
    from safetensors.torch import save_file

    from workbench.model.data import calibration_batches, default_seq_len
    from workbench.model.inventory import layer_inventory
    from workbench.stats.activations import collect_activation_stats

    names = [x.name for x in layer_inventory(loaded.model)] if names is None else list(names)
    if not names:
        return {}
    d = loaded.description
    seq_len = seq_len or default_seq_len(d.max_context)
    ident = f"{d.fingerprint}|{d.source}|{text}|{n_seqs}|{seq_len}|{seed}|v2|" + ",".join(sorted(set(names)))
    path = cache_dir("grams") / f"{hashlib.sha1(ident.encode()).hexdigest()[:16]}.safetensors"
    if use_cache and path.is_file():
        grams = _load_grams(path)
        if all(n in grams for n in names):
            return {n: grams[n] for n in names}
    batches = calibration_batches(loaded.tokenizer, text, n_seqs, seq_len, seed, max_context=d.max_context)
    stats = collect_activation_stats(loaded.model, batches, names, gram=True, progress=progress)
    tensors = {n: st.gram.float().cpu().contiguous() for n, st in stats.items() if st.shared_with is None}
    alias = {n: st.shared_with for n, st in stats.items() if st.shared_with is not None}
    if use_cache:
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            tensors, str(tmp), metadata=alias
        )  # safetensors refuses shared storage: aliases in metadata
        tmp.replace(path)
    grams = dict(tensors)
    grams.update({n: tensors[lead] for n, lead in alias.items()})
    return {n: grams[n] for n in names}


def _load_grams(path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
        alias = f.metadata() or {}
    out.update({n: out[lead] for n, lead in alias.items() if lead in out})
    return out
