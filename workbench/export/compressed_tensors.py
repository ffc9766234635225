"""Export a plan as a compressed-tensors checkpoint (the format vLLM and llm-compressor load).

`compressed_tensors_export(loaded, resolved, out)` writes a Hugging Face model folder: `config.json` with a
`quantization_config` (format `pack-quantized`, status `compressed`), `model.safetensors` and the tokenizer
files when the tokenizer can save itself.

What goes where:
- every integer layer of the plan (`int{b}` with b in 2..8; `_g{G}`, `_ch` or `_t`; `sym` or `asym`;
  algorithm `rtn` or `gptq`) is stored with *our* codes and scales, converted without re-rounding:
  `weight_packed` = codes - 2^(b-1) (signed, packed into int32 by compressed-tensors' own `pack_to_int32`),
  `weight_scale` = our scales (fp16 values, stored as float16, `scale_dtype` float16), and for asymmetric
  specs `weight_zero_point` = zeros - 2^(b-1) (packed likewise). Its dequantization
  (q - zp) * scale is then exactly ours, (codes - zeros) * scales.
- each distinct spec becomes one config group (`group_0`, `group_1`, ...) whose targets are the exact
  layer names: mixed bit widths and group sizes in one file.
- layers the format cannot hold this way are listed in `notes`, named in `ignore` and kept in bf16: float
  formats (fp8, fp4, mxfp4, nvfp4, nf4), AWQ layers (their per-input-channel scale has no place in a
  per-layer scheme), an lm_head tied to the embeddings (one tensor serves both), and group specs whose
  group size does not divide the layer's columns (compressed-tensors' group strategy refuses those).
  Everything else (embeddings, norms, high-precision layers) is stored in bf16.

The quantization convention of compressed-tensors: q = clamp(round(x / scale) + zp, -2^(b-1), 2^(b-1) - 1),
x_hat = (q - zp) * scale; strategy `group` groups `group_size` input columns (the last one shorter),
`channel` has one scale per output row, `tensor` one scale. Loading it back with compressed-tensors'
decompressor is what `tests/test_export_formats.py` checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.quant.spec import QuantSpec

_STRATEGY = {"group": "group", "channel": "channel", "tensor": "tensor"}


@dataclass
class CtExport:
    """What a compressed-tensors export wrote: the folder, one row per quantized layer, and the notes."""

    folder: Path
    groups: dict[str, list[str]]  # spec string -> layer names (one config group each)
    kept: list[str]  # layers of the plan stored in bf16
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "folder": str(self.folder),
            "groups": self.groups,
            "kept_bf16": self.kept,
            "notes": self.notes,
        }


def ct_expressible(spec: QuantSpec, tied: bool, in_features: int) -> str | None:
    """None when a layer's spec goes into the checkpoint as integers; else why it is kept in bf16."""
    if not spec.is_quantized:
        return None
    if spec.fmt != "int":
        return f"{spec.fmt} is not an integer format of this export"
    if spec.algo == "awq":
        return "AWQ's per-input-channel scale has no place in a per-layer scheme"
    if tied:
        return "tied to the embeddings (one tensor serves both)"
    if spec.granularity == "group" and in_features % spec.group_size:
        return f"{in_features} columns are not a multiple of the group size (compressed-tensors needs that)"
    return None


def ct_scheme_args(spec: QuantSpec) -> dict:
    """The `weights` QuantizationArgs of a config group for an integer spec (JSON form)."""
    args = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": _STRATEGY[spec.granularity],
        "group_size": spec.group_size if spec.granularity == "group" else None,
        "dynamic": False,
        "scale_dtype": "torch.float16",
        "zp_dtype": None if spec.symmetric else "torch.int8",
    }
    return args


def ct_layer_tensors(qw, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized tensors of one quantized weight (a QuantizedWeight, codes [N, K]).

    Returns {"weight_packed": int32 [N, ceil(K*b/32)], "weight_scale": fp16 [N, n_groups] ([N, 1] per
    channel, [1] per tensor), "weight_shape": int64 [2], "weight_zero_point": int32 packed (asym only)}.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits, half = spec.bits, 2 ** (spec.bits - 1)
    N, K = qw.codes.shape
    q = (qw.codes.to(torch.int16) - half).to(torch.int8)  # [N, K] in [-2^(b-1), 2^(b-1) - 1]
    scales = qw.scales.reshape(-1) if spec.granularity == "tensor" else qw.scales
    out = {
        "weight_packed": pack_to_int32(q, bits),
        "weight_scale": scales.to(torch.float16).contiguous(),
        "weight_shape": torch.tensor([N, K], dtype=torch.int64),
    }
    if not spec.symmetric:
        zp = (qw.zeros - half).to(torch.int8)  # [N, n_groups]
        if spec.granularity == "tensor":
            out["weight_zero_point"] = zp.reshape(-1).contiguous()
        else:
            out["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0).contiguous()
    return out


def _quantization_config(groups: dict[str, list[str]], ignore: list[str]) -> dict:
    config_groups = {
        f"group_{i}": {"targets": names, "weights": ct_scheme_args(QuantSpec.parse(spec))}
        for i, (spec, names) in enumerate(groups.items())
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
    }


def compressed_tensors_export(
    loaded, resolved: dict[str, QuantSpec], out: str | Path, grams: dict[str, torch.Tensor] | None = None
) -> CtExport:
    """Write `loaded` (a LoadedModel) quantized by `resolved` as a compressed-tensors folder at `out`.

    Args:
        resolved: {layer: QuantSpec} (`Plan.resolve(layers)`); layers not in it stay in bf16.
        grams: Gram matrices [K, K] for gptq layers (`simulate.calibration_grams`).
    Raises:
        WorkbenchError: compressed-tensors is not installed, or a gptq layer has no Gram matrix.
    """
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise WorkbenchError(
            "the compressed-tensors export needs the compressed-tensors package: "
            "pip install 'quant-workbench[export]'"
        ) from None
    from safetensors.torch import save_file

    from workbench.model.inventory import get_linear_weight, get_module, layer_inventory
    from workbench.quant.api import quantize_weight

    model = loaded.model
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    groups: dict[str, list[str]] = {}
    kept, notes = [], []
    for layer in layer_inventory(model):
        spec = QuantSpec.parse(resolved.get(layer.name, "bf16"))
        why = ct_expressible(spec, layer.tied, layer.in_features)
        if not spec.is_quantized or why:
            kept.append(layer.name)
            if why:
                notes.append(f"{layer.name} ({spec}) kept in bf16: {why}")
            continue
        if spec.algo == "gptq" and (grams or {}).get(layer.name) is None:
            raise WorkbenchError(f"layer {layer.name}: '{spec}' needs its Gram matrix; pass grams=")
        W = get_linear_weight(get_module(model, layer.name)).detach().float()
        qw = quantize_weight(W, spec, (grams or {}).get(layer.name) if spec.algo == "gptq" else None)
        del tensors[f"{layer.name}.weight"]
        tensors.update({f"{layer.name}.{k}": v for k, v in ct_layer_tensors(qw, spec).items()})
        groups.setdefault(str(spec), []).append(layer.name)
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # stored once, as the embedding
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["torch_dtype"] = "bfloat16"
    config["quantization_config"] = _quantization_config(groups, kept)
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    _save_tokenizer(loaded.tokenizer, folder, notes)
    return CtExport(folder=folder, groups=groups, kept=kept, notes=notes)


def _save_tokenizer(tokenizer, folder: Path, notes: list[str]) -> None:
    """Save an HF tokenizer beside the weights; say so when the model's tokenizer cannot be saved."""
    inner = getattr(tokenizer, "inner", tokenizer)
    if hasattr(inner, "save_pretrained"):
        inner.save_pretrained(str(folder))
    else:
        notes.append(f"tokenizer ({type(inner).__name__}) not saved: it is not a Hugging Face tokenizer")
