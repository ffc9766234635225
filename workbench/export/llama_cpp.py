"""Export a resolved plan for llama.cpp: a tensor-type override file for `llama-quantize --tensor-type-file`.

File format (llama.cpp `tools/quantize`, `parse_tensor_type_file`): whitespace-separated tokens
`<pattern>=<ggml type>`; the pattern is lower-cased and matched with `std::regex_search` against GGUF tensor
names (recent llama.cpp stops at the first match, older releases let the last match win). There is no comment
syntax: a `#` token is a parse error. We therefore write one anchored, exact pattern per tensor
(`^blk\\.3\\.ffn_down\\.weight$=q4_K`), so no two patterns overlap and the match order does not matter, and we
return our notes separately. Overrides only act when the base type given to llama-quantize is itself a
quantized type (e.g. `llama-quantize --tensor-type-file plan.txt in-f16.gguf out.gguf Q4_K_M`).

Tensor names (HF Llama -> GGUF): `model.layers.N.self_attn.{q,k,v,o}_proj` -> `blk.N.attn_{q,k,v,output}`,
`model.layers.N.mlp.{gate,up,down}_proj` -> `blk.N.ffn_{gate,up,down}`, `lm_head` -> `output`. A tied lm_head
has no `output` tensor in GGUF (the output reuses `token_embd.weight`), so its type goes to `token_embd`,
which then also stores the input embeddings at that type.

Mapping of our specs to the nearest GGUF type (bits per weight of the GGUF type in brackets):

    ours                               GGUF            why
    bf16 / fp16                        BF16 / F16      same
    int8_*, fp8_e4m3, fp8_e5m2         Q8_0   (8.5)    8-bit, block-32 fp16 scale (GGUF has no fp8)
    int7_*                             Q8_0   (8.5)    no 7-bit type: round up
    int6_*                             Q6_K   (6.56)
    int5_*                             Q5_K   (5.5)
    int4_*                             Q4_K   (4.5)    asymmetric 4-bit, scale+min per 32
    nf4_g*                             IQ4_NL (4.5)    non-uniform 4-bit levels, block 32
    mxfp4, nvfp4, fp4_e2m1_g*          MXFP4  (4.25)   E2M1 elements (GGUF has no E4M3-scaled nvfp4)
    int3_*                             Q3_K   (3.44)
    int2_*                             Q2_K   (2.63)

K-quants (Q2_K..Q6_K) need rows (in_features) that are a multiple of 256, and the 32-block types a
multiple of 32. When a layer's rows do not fit, we pick what llama.cpp itself would fall back to
(Q2_K/Q3_K -> IQ4_NL, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; 32-block types -> F16) and say so in the
notes: e.g. SmolLM2 (576 columns) has no 2- or 3-bit GGUF type at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.model.inventory import LayerInfo
from workbench.paths import atomic_write_bytes
from workbench.quant.spec import QuantSpec

_GGUF_ROLE = {
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}
_BLOCK = {
    "q2_K": 256,
    "q3_K": 256,
    "q4_K": 256,
    "q5_K": 256,
    "q6_K": 256,
    "q8_0": 32,
    "q5_0": 32,
    "q5_1": 32,
    "iq4_nl": 32,
    "mxfp4": 32,
    "bf16": 1,
    "f16": 1,
}
_FALLBACK = {
    "q2_K": "iq4_nl",
    "q3_K": "iq4_nl",
    "q4_K": "q5_0",
    "q5_K": "q5_1",
    "q6_K": "q8_0",
    "q8_0": "f16",
    "q5_0": "f16",
    "q5_1": "f16",
    "iq4_nl": "f16",
    "mxfp4": "f16",
}


def gguf_type(spec: QuantSpec | str) -> str:
    """The nearest GGUF (ggml) type name for a spec, ignoring the layer shape (see the module table)."""
    spec = QuantSpec.parse(spec)
    return spec.format.gguf(spec)


def gguf_tensor_name(layer: LayerInfo) -> str:
    """GGUF tensor name of a Llama layer: 'blk.3.ffn_down.weight', 'output.weight' or 'token_embd.weight'."""
    if layer.role == "lm_head":
        return "token_embd.weight" if layer.tied else "output.weight"
    if layer.block is None or layer.role not in _GGUF_ROLE:
        raise WorkbenchError(f"layer {layer.name} (role '{layer.role}') has no llama.cpp tensor name")
    return f"blk.{layer.block}.{_GGUF_ROLE[layer.role]}.weight"


@dataclass
class LlamaCppExport:
    """The override file text and what was approximated on the way."""

    text: str
    rows: list[tuple[str, str, str, str]]  # (layer, spec, gguf tensor, gguf type)
    notes: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), self.text.encode("ascii"))


def llama_cpp_export(resolved: dict[str, QuantSpec], layers: list[LayerInfo]) -> LlamaCppExport:
    """Map a resolved plan to llama.cpp tensor-type overrides, one exact pattern per tensor.

    Raises:
        WorkbenchError: a layer has no GGUF tensor name (not a Llama-style model).
    """
    rows, notes, lines = [], [], []
    fallbacks: dict[tuple[str, str, int], int] = {}
    for layer in layers:
        if layer.name not in resolved:
            continue
        spec = QuantSpec.parse(resolved[layer.name])
        tensor = gguf_tensor_name(layer)
        want = gguf_type(spec)
        got = want
        while layer.in_features % _BLOCK[got]:
            got = _FALLBACK[got]
        if got != want:
            key = (want, got, layer.in_features)
            fallbacks[key] = fallbacks.get(key, 0) + 1
        rows.append((layer.name, str(spec), tensor, got))
        lines.append(f"^{re.escape(tensor)}$={got}")
        if layer.role == "lm_head" and layer.tied:
            notes.append(
                f"{layer.name} is tied to the embeddings: its type ({got}) is set on token_embd.weight, "
                "which stores both in GGUF"
            )
    for (want, got, k), n in fallbacks.items():
        notes.append(
            f"{n} tensor(s) with {k} columns cannot use {want} (block {_BLOCK[want]}): using {got}, "
            "as llama.cpp itself would"
        )
    return LlamaCppExport(text="\n".join(lines) + "\n", rows=rows, notes=notes)


def llama_cpp_tensor_types(resolved: dict[str, QuantSpec], layers: list[LayerInfo]) -> str:
    """The `--tensor-type-file` text of `llama_cpp_export` (the ARCHITECTURE.md contract)."""
    return llama_cpp_export(resolved, layers).text
