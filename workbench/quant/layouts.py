"""Packed runtime layouts: the buffers a `QuantLinear` holds for a quantized weight, how to fill, read them.

Each format of the registry (registry.py) names one layout. A layout is three pure functions of tensors:
    empty(spec, N, K, device)   {buffer name: empty tensor or None}: shapes and storage dtypes of the buffers
    pack(qw, device)            {buffer name: tensor}: a `QuantizedWeight` (api.py) in that layout
    dequantize(spec, bufs, K, decode)   W_q [N, K] float32 from the buffers (codes and scales only; `decode`
                                is the format's decode of grouped codes, registry.py)
Buffer names are part of the saved-model format (runtime/serialize.py): `packed`, `scales`, `zeros`,
`tensor_scale`. The layouts (shapes as stored; K padded as in packing.py):

    int      packed int32 [N, packed_words(K, bits)]   codes, bits in packing.SUPPORTED_BITS
             scales fp16  [n_groups, N]                 per-tensor specs are stored per channel
             zeros  fp16  [n_groups, N]                 asymmetric only
    fp8      packed int32 [N, packed_words(K, 8)]      8-bit patterns packed like int8 codes
             scales fp32  [N]                           per-tensor specs are stored per channel
    fp4      packed int32 [N, packed_words(K, 4)]      4-bit codes packed like int4 codes
             scales fp32  [N, n_groups]                 + tensor_scale fp32 [] when the format has one
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from workbench.quant.formats import Encoded, to_groups
from workbench.quant.packing import (
    SUPPORTED_BITS,
    n_groups,
    pack_codes,
    packed_words,
    prepare_fp8_params,
    prepare_group_params,
    unpack_codes,
)

if TYPE_CHECKING:
    from workbench.quant.spec import QuantSpec

Buffers = dict[str, "torch.Tensor | None"]
Decode = Callable[["QuantSpec", Encoded], torch.Tensor]


def stored_group_size(spec: QuantSpec, in_features: int) -> int:
    """Group size as stored: the spec's group, or K for per-channel and per-tensor (stored per channel)."""
    return spec.group_size if spec.granularity == "group" else in_features


@dataclass(frozen=True)
class Layout:
    """One packed layout (module docstring): buffer names and the functions that build and read them."""

    name: str
    buffers: tuple[str, ...]
    empty: Callable[[QuantSpec, int, int, torch.device | None], Buffers]
    pack: Callable[[object, torch.device], Buffers]
    dequantize: Callable[[QuantSpec, Buffers, int, Decode], torch.Tensor]
    check: Callable[[QuantSpec], str | None] = lambda spec: None  # why the spec has no such layout


# ---------------------------------------------------------------------------------------------- int
def _int_check(spec: QuantSpec) -> str | None:
    if spec.bits not in SUPPORTED_BITS:
        return f"{spec.bits}-bit integers have no packed layout (supported: {SUPPORTED_BITS})"
    return None


def _int_empty(spec: QuantSpec, N: int, K: int, device) -> Buffers:
    ng = n_groups(K, stored_group_size(spec, K))
    return {
        "packed": torch.empty(N, packed_words(K, spec.bits), dtype=torch.int32, device=device),
        "scales": torch.empty(ng, N, dtype=torch.float16, device=device),
        "zeros": None if spec.symmetric else torch.empty(ng, N, dtype=torch.float16, device=device),
    }


def _int_pack(qw, device) -> Buffers:
    spec = qw.spec
    N, K = qw.codes.shape
    scales, zeros = qw.scales, qw.zeros
    if spec.granularity == "tensor":  # kernels read per-channel scales: expand the one value
        scales = scales.reshape(1, 1).expand(N, 1)
        zeros = zeros.reshape(1, 1).expand(N, 1) if zeros is not None else None
    s_t, z_t = prepare_group_params(
        scales.to(device), None if zeros is None else zeros.to(device), K, stored_group_size(spec, K)
    )
    return {"packed": pack_codes(qw.codes.to(device), spec.bits), "scales": s_t, "zeros": z_t}


def _int_dequantize(spec: QuantSpec, bufs: Buffers, K: int, decode: Decode) -> torch.Tensor:
    from workbench.kernels.reference import dequantize_int

    G = stored_group_size(spec, K)
    return dequantize_int(bufs["packed"], bufs["scales"], bufs["zeros"], spec.bits, G, K)


INT = Layout("int", ("packed", "scales", "zeros"), _int_empty, _int_pack, _int_dequantize, _int_check)


# ---------------------------------------------------------------------------------------------- float codes
def _decode_rows(
    spec: QuantSpec, codes: torch.Tensor, scales: torch.Tensor, ts, decode: Decode
) -> torch.Tensor:
    """codes uint8 [N, K] with scales [N, n_groups] -> W_q [N, K] through the format's decode."""
    N, K = codes.shape
    G = stored_group_size(spec, K)
    vals = decode(spec, Encoded(to_groups(codes, G), scales, None, ts))  # [N, n_groups, G]
    return vals.reshape(N, -1)[:, :K]


def _fp8_empty(spec: QuantSpec, N: int, K: int, device) -> Buffers:
    return {
        "packed": torch.empty(N, packed_words(K, 8), dtype=torch.int32, device=device),
        "scales": torch.empty(N, dtype=torch.float32, device=device),
    }


def _fp8_pack(qw, device) -> Buffers:
    N = qw.codes.shape[0]
    scales = qw.scales.reshape(-1)
    if scales.numel() == 1:
        scales = scales.expand(N)
    packed, s = prepare_fp8_params(qw.codes.to(device), scales.to(device))
    return {"packed": packed, "scales": s}


def _fp8_dequantize(spec: QuantSpec, bufs: Buffers, K: int, decode: Decode) -> torch.Tensor:
    codes = unpack_codes(bufs["packed"], 8, K)
    return _decode_rows(spec, codes, bufs["scales"][:, None], None, decode)


FP8 = Layout("fp8", ("packed", "scales"), _fp8_empty, _fp8_pack, _fp8_dequantize)


def _fp4_empty(spec: QuantSpec, N: int, K: int, device) -> Buffers:
    ts = torch.empty((), dtype=torch.float32, device=device) if spec.fmt == "nvfp4" else None
    return {
        "packed": torch.empty(N, packed_words(K, 4), dtype=torch.int32, device=device),
        "scales": torch.empty(N, spec.n_groups(K), dtype=torch.float32, device=device),
        "tensor_scale": ts,
    }


def _fp4_pack(qw, device) -> Buffers:
    ts = qw.tensor_scale
    return {
        "packed": pack_codes(qw.codes.to(device), 4),
        "scales": qw.scales.to(device, torch.float32),
        "tensor_scale": None if ts is None else ts.to(device, torch.float32).reshape(()),
    }


def _fp4_dequantize(spec: QuantSpec, bufs: Buffers, K: int, decode: Decode) -> torch.Tensor:
    codes = unpack_codes(bufs["packed"], 4, K)
    return _decode_rows(spec, codes, bufs["scales"], bufs.get("tensor_scale"), decode)


FP4 = Layout("fp4", ("packed", "scales", "tensor_scale"), _fp4_empty, _fp4_pack, _fp4_dequantize)
