"""Save and load a quantized model: packed safetensors + the plan + a versioned manifest.

A saved model is a folder:

    model.safetensors   every tensor of the model's state_dict (QuantLinear buffers in the packed layout of
                        workbench.quant.packing, ActQuantLinear's int8 / e4m3 codes and fp32 scales, the rest
                        as they are); tied tensors stored once. Its header metadata holds
                        {"format": "workbench.quantized", "layout_version": "1" or "2", "manifest": <JSON>}.
    blocks-00000.safetensors ...  only in a model written block by block (workbench.streaming.quantize): the
                        decoder blocks' tensors, listed in the manifest's "shards"; model.safetensors holds
                        the rest.
    plan.json           the plan that produced it (workbench.plan.plan format).
    manifest.json       a readable copy of the manifest: model config, dtype, source, and per quantized layer
                        its kind, spec, shape, bias and AWQ input scale; the activation specs simulated by
                        input hooks ("acts"); the aliases of tied tensors.
    tokenizer/ or tokenizer.bin   the tokenizer (Hugging Face folder, or llama2.c's binary vocabulary).

Versions (the header's "layout_version"): 1 holds QuantLinear layers only (quant.packing's LAYOUT_VERSION 1);
2 adds W8A8 layers (kind "w8a8": runtime/act_linear.py, w_q [N, K] int8 / float8_e4m3fn, s_w fp32 [N]) and
activation specs run as fake-quantizing input hooks (plan version 2 on the CPU, or layers no W8A8 kernel
runs). A file is written at the lowest version that holds it, so a model without either stays readable by a
version-1 workbench, which refuses a version-2 file instead of silently dropping its activation quantization.

`load_quantized` trusts only the safetensors header: it refuses another format tag or a layout version it
does not know (a file written by a newer workbench), rebuilds the architecture from the config without
initialising weights, swaps in empty layers of each recorded kind (refusing a kind it does not know, naming
the layer), re-attaches online Hadamards and activation hooks, and loads every tensor strictly.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.quant.packing import LAYOUT_VERSION
from workbench.runtime.act_linear import ActQuantLinear
from workbench.runtime.qlinear import QuantLinear

FORMAT = "workbench.quantized"
WEIGHTS = "model.safetensors"
ACT_VERSION = 2  # the file version that adds W8A8 layers and activation hooks (module docstring)
VERSIONS = (LAYOUT_VERSION, ACT_VERSION)  # the versions this workbench reads


def packed_entry(mod: QuantLinear) -> dict:
    """The manifest entry of one packed layer (also written by the streamed quantizer)."""
    return {
        "kind": "packed",
        "spec": str(mod.spec),
        "in_features": mod.in_features,
        "out_features": mod.out_features,
        "bias": mod.bias is not None,
        "input_scale": mod.input_scale is not None,
        "backend": mod.backend,
    }


def _packed_empty(name: str, info: dict, dtype: torch.dtype) -> QuantLinear:
    return QuantLinear(
        info["spec"],
        info["in_features"],
        info["out_features"],
        bias=info["bias"],
        has_input_scale=info["input_scale"],
        dtype=dtype,
        name=name,
        backend=info.get("backend", "auto"),
    )


def _w8a8_entry(mod: ActQuantLinear) -> dict:
    return {
        "kind": "w8a8",
        "w8a8": mod.kind,
        "act": str(mod.act),
        "in_features": mod.in_features,
        "out_features": mod.out_features,
        "bias": mod.bias is not None,
    }


def _w8a8_empty(name: str, info: dict, dtype: torch.dtype) -> ActQuantLinear:
    return ActQuantLinear.empty(
        info["w8a8"],
        info["act"],
        info["in_features"],
        info["out_features"],
        bias=info["bias"],
        dtype=dtype,
        name=name,
    )


# kind of a saved layer -> (module class, manifest entry of a module, empty module from an entry [name, entry,
# activation dtype]); a version-1 entry has no "kind" and is "packed"
LAYER_KINDS = {
    "packed": (QuantLinear, packed_entry, _packed_empty),
    "w8a8": (ActQuantLinear, _w8a8_entry, _w8a8_empty),
}


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def _manifest(model, source: str | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors to write) with tied tensors deduplicated."""
    from workbench.model.inventory import is_conv1d

    layers = {}
    for name, mod in model.named_modules():
        for cls, entry, _ in LAYER_KINDS.values():
            if isinstance(mod, cls):
                layers[name] = entry(mod)
    acts = {n: m.workbench_act for n, m in model.named_modules() if hasattr(m, "workbench_act")}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        k = _storage_key(t)
        if k in first:
            aliases[key] = first[k]
            continue
        first[k] = key
        tensors[key] = t.detach().contiguous().cpu()
    emb = model.get_input_embeddings()
    w8a8 = any(e["kind"] == "w8a8" for e in layers.values())
    manifest = {
        "format": FORMAT,
        "layout_version": ACT_VERSION if (w8a8 or acts) else LAYOUT_VERSION,
        "architecture": (getattr(model.config, "architectures", None) or [type(model).__name__])[0],
        "config": model.config.to_dict(),
        "dtype": str(emb.weight.dtype).replace("torch.", "") if emb is not None else "float32",
        "source": source,
        "layers": layers,
        "aliases": aliases,
        "conv1d": sorted(n for n, m in model.named_modules() if is_conv1d(m)),
        # a rotated model (plan transforms): layers with an online Hadamard before them (rotate.py)
        "online_hadamard": sorted(n for n, m in model.named_modules() if hasattr(m, "online_hadamard")),
        # layers whose input is fake-quantized by a forward pre-hook (apply_plan's _simulate_acts)
        "acts": acts,
    }
    return manifest, tensors


def save_tokenizer(tokenizer, folder: Path) -> str | None:
    """Write the tokenizer beside the weights; returns its kind ("hf" / "llama2c") or None."""
    if tokenizer is None:
        return None
    inner = getattr(tokenizer, "inner", tokenizer)
    if hasattr(inner, "save_pretrained"):
        inner.save_pretrained(str(folder / "tokenizer"))
        return "hf"
    if hasattr(inner, "pieces") and hasattr(inner, "scores"):  # llama2.c vocabulary: same binary format
        parts = [struct.pack("<i", int(inner.max_token_length))]
        for piece, score in zip(inner.pieces, inner.scores):
            parts.append(struct.pack("<fi", float(score), len(piece)) + bytes(piece))
        (folder / "tokenizer.bin").write_bytes(b"".join(parts))
        return "llama2c"
    return None


def save_quantized(model, plan, path: str | Path, *, tokenizer=None, source: str | None = None) -> Path:
    """Write a quantized model (after apply_plan) to the folder `path` (layout: module docstring).

    Args:
        model: transformers CausalLM with QuantLinear layers.
        plan: the Plan (or {layer: spec} dict) that was applied.
        path: output folder (created; existing files of the same names are replaced).
        tokenizer: optional workbench Tokenizer / HF tokenizer / Llama2cTokenizer to store beside it.
        source: where the original model came from (recorded, not used for loading).
    Returns:
        the folder.
    """
    from safetensors.torch import save_file

    from workbench.plan.plan import Plan

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise WorkbenchError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if not isinstance(plan, Plan):
        plan = Plan.from_resolved(dict(plan))
    manifest, tensors = _manifest(model, source)
    manifest["tokenizer"] = save_tokenizer(tokenizer, folder)
    meta = {
        "format": FORMAT,
        "layout_version": str(manifest["layout_version"]),
        "manifest": json.dumps(manifest),
    }
    save_file(tensors, str(folder / WEIGHTS), metadata=meta)
    plan.save(folder / "plan.json")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def read_manifest(path: str | Path) -> dict:
    """The manifest of a saved quantized model, after checking its format tag and layout version."""
    from safetensors import safe_open

    folder = Path(path)
    f = folder / WEIGHTS if folder.is_dir() else folder
    if not f.is_file():
        raise WorkbenchError(f"{folder}: no {WEIGHTS} (not a saved quantized model)")
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise WorkbenchError(f"{f}: not a readable safetensors file ({type(exc).__name__})") from None
    if meta.get("format") != FORMAT:
        raise WorkbenchError(
            f"{f}: not a workbench quantized model (format tag {meta.get('format')!r}, expected '{FORMAT}')"
        )
    version = meta.get("layout_version")
    if version not in [str(v) for v in VERSIONS]:
        raise WorkbenchError(
            f"{f}: packed layout version {version!r} is unknown to this workbench (it reads versions "
            f"{', '.join(map(str, VERSIONS))}); re-quantize the model or upgrade the workbench"
        )
    try:
        return json.loads(meta["manifest"])
    except (KeyError, json.JSONDecodeError):
        raise WorkbenchError(f"{f}: missing or corrupt manifest in the safetensors header") from None


def is_quantized_folder(path: str | Path) -> bool:
    """True when `path` is a folder written by save_quantized (cheap check, no validation)."""
    p = Path(path)
    return p.is_dir() and (p / WEIGHTS).is_file() and (p / "manifest.json").is_file()


def _empty_model(manifest: dict, dtype: torch.dtype):
    """The architecture from the manifest's config, on CPU, without weight initialisation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(manifest["config"])
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise WorkbenchError("saved model manifest has no model_type in its config")
    config = AutoConfig.for_model(model_type, **cfg)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise (slower, same result after loading)
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _swap_in_layers(model, manifest: dict, dtype: torch.dtype, folder: Path) -> None:
    """Replace every layer of the manifest by an empty module of its kind (LAYER_KINDS)."""
    for name, info in manifest["layers"].items():
        kind = info.get("kind", "packed")
        if kind not in LAYER_KINDS:
            raise WorkbenchError(
                f"{folder}: layer '{name}' is of kind {kind!r}, unknown to this workbench (it reads "
                f"{', '.join(LAYER_KINDS)}); upgrade the workbench"
            )
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            getattr(parent, leaf)
        except AttributeError:
            raise WorkbenchError(
                f"{folder}: layer '{name}' of the manifest is not in the architecture"
            ) from None
        setattr(parent, leaf, LAYER_KINDS[kind][2](name, info, dtype))


def _attach_hooks(model, manifest: dict) -> None:
    """The online Hadamards (buffers filled by the loader), then the activation hooks, in apply_plan's order:
    the input is rotated first, then quantized."""
    from workbench.measure.simulate import add_act_hooks

    if manifest.get("online_hadamard"):
        from workbench.transform.rotate import attach_online_hadamard

        for name in manifest["online_hadamard"]:
            mod = model.get_submodule(name)
            attach_online_hadamard(mod, mod.in_features)
    acts = manifest.get("acts") or {}
    add_act_hooks(model, acts)
    for name, act in acts.items():
        model.get_submodule(name).workbench_act = act


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a folder written by save_quantized.

    Args:
        path: the folder.
        device: where to put the model.
        dtype: activation dtype (default: the saved one); packed buffers keep their storage types.
    Returns:
        (model, plan): transformers CausalLM with QuantLinear layers (eval mode), and the Plan.
    Raises:
        WorkbenchError: not a saved model, unknown layout version or layer kind, missing or unexpected
            tensors.
    """
    from safetensors.torch import load_file

    from workbench.plan.plan import Plan

    folder = Path(path)
    manifest = read_manifest(folder)
    saved_dtype = getattr(torch, manifest.get("dtype", "float32"))
    model = _empty_model(manifest, saved_dtype)
    _swap_in_layers(model, manifest, saved_dtype, folder)
    _attach_hooks(model, manifest)
    state = load_file(str(folder / WEIGHTS))
    for shard in manifest.get("shards", []):  # written block by block (workbench.streaming.quantize)
        if not (folder / shard).is_file():
            raise WorkbenchError(f"{folder}: shard {shard} named in the manifest is missing")
        state.update(load_file(str(folder / shard)))
    expected = set(model.state_dict().keys())
    aliases = manifest.get("aliases", {})
    missing = sorted(expected - set(state) - set(aliases))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise WorkbenchError(
            f"{folder}: tensors do not match the architecture (missing: {missing[:4]}, "
            f"unexpected: {unexpected[:4]})"
        )
    for key, ref in aliases.items():
        state[key] = state[ref]
    for key, t in model.state_dict().items():
        if tuple(state[key].shape) != tuple(t.shape):
            raise WorkbenchError(
                f"{folder}: tensor '{key}' has shape {tuple(state[key].shape)}, the "
                f"architecture expects {tuple(t.shape)}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    for key, ref in aliases.items():  # re-tie: the alias points at the same Parameter as its reference
        mod_name, _, attr = key.rpartition(".")
        ref_mod, _, ref_attr = ref.rpartition(".")
        setattr(model.get_submodule(mod_name), attr, getattr(model.get_submodule(ref_mod), ref_attr))
    if dtype is not None:
        model = model.to(dtype)
    model = model.to(device).eval()
    plan_file = folder / "plan.json"
    plan = Plan.load(plan_file) if plan_file.is_file() else None
    if plan is not None and plan.transforms:
        model.workbench_transforms = tuple(plan.transforms)  # the model the plan's transforms made
    return model, plan


def load_tokenizer(path: str | Path):
    """The workbench Tokenizer saved beside a quantized model, or None."""
    from workbench.model.tokenizer import Tokenizer

    folder = Path(path)
    if (folder / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        return Tokenizer(AutoTokenizer.from_pretrained(str(folder / "tokenizer")))
    if (folder / "tokenizer.bin").is_file():
        from workbench.model.llama2c import Llama2cTokenizer

        return Tokenizer(Llama2cTokenizer(folder / "tokenizer.bin"))
    return None
