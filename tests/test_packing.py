"""Bit packing: exact round trips for every width and odd shapes, the documented layout, storage bytes."""

from __future__ import annotations

import itertools

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.quant.packing import (
    k_align,
    n_groups,
    pack_codes,
    packed_k,
    packed_nbytes,
    packed_words,
    prepare_fp8_params,
    prepare_group_params,
    unpack_codes,
)

SHAPES = [(1, 33), (5, 172), (3, 576), (8, 64), (2, 4096), (4, 1), (7, 129), (1, 14336)]
BITS = [2, 3, 4, 8]


@pytest.mark.parametrize("shape,bits", list(itertools.product(SHAPES, BITS)), ids=lambda v: str(v))
def test_round_trip_exact(shape, bits):
    N, K = shape
    g = torch.Generator().manual_seed(N * 1000 + K + bits)
    codes = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8, generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (N, packed_words(K, bits))
    assert packed.shape[1] * 32 == packed_k(K, bits) * bits  # exactly `bits` bits per (padded) weight
    assert packed.shape[1] % 4 == 0  # rows are whole 16-byte vectors
    assert torch.equal(unpack_codes(packed, bits, K), codes)


def test_extreme_codes_round_trip():
    for bits in BITS:
        codes = torch.full((3, 100), 2**bits - 1, dtype=torch.uint8)
        codes[1] = 0
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 100), codes)


def _slot_of(k: int, bits: int) -> tuple[int, int]:
    """(word, bit offset) of column k in the documented chunk-interleaved layout (bits in 2, 4, 8)."""
    c, m = divmod(k, 32)
    return c * bits + m % bits, (m // bits) * bits


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_layout_matches_docstring(bits):
    N, K = 3, 200
    codes = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8)
    packed = pack_codes(codes, bits).to(torch.int64) & 0xFFFFFFFF
    for k in range(K):
        word, off = _slot_of(k, bits)
        assert torch.equal(((packed[:, word] >> off) & (2**bits - 1)).to(torch.uint8), codes[:, k]), k
    Kp = packed_k(K, bits)
    for k in range(K, Kp):  # zero padding
        word, off = _slot_of(k, bits)
        assert int(((packed[:, word] >> off) & (2**bits - 1)).abs().sum()) == 0


def test_layout_4bit_first_chunk():
    codes = torch.arange(32, dtype=torch.uint8).remainder(16)[None, :]  # columns 0..31 -> 0..15, 0..15
    packed = pack_codes(codes, 4)
    # word w holds columns w, w+4, w+8, ..., w+28 (slots 0..7): word 0 = 0,4,8,12,0,4,8,12
    assert int(packed[0, 0]) == 0xC840C840 - 2**32
    assert int(packed[0, 1]) == 0xD951D951 - 2**32


def test_layout_3bit_planes():
    N, K = 4, 172
    codes = torch.randint(0, 8, (N, K), dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    Kp = packed_k(K, 3)
    assert Kp == 256 and packed.shape == (N, 3 * Kp // 32)
    lo = packed[:, : Kp // 16]
    two = pack_codes(codes & 3, 2)  # the 2-bit plane is the 2-bit layout (padded further, with zeros)
    assert torch.equal(lo[:, : two.shape[1]], two) and int(lo[:, two.shape[1] :].abs().sum()) == 0
    hi = packed[:, Kp // 16 :].to(torch.int64) & 0xFFFFFFFF
    for k in range(K):
        c, m = divmod(k, 32)
        j, w = divmod(m, 2)  # slot j of low word 2c + w
        bit = (hi[:, c] >> (w * 16 + j)) & 1
        assert torch.equal(bit.to(torch.uint8), codes[:, k] >> 2), k


def test_storage_bytes():
    assert packed_nbytes(14336, 4096, 4) == 14336 * 4096 // 2 == 29_360_128
    assert packed_nbytes(14336, 4096, 3) == 14336 * 4096 * 3 // 8
    assert packed_nbytes(14336, 4096, 2) == 14336 * 4096 // 4
    assert packed_k(576, 4) == 576 and packed_k(576, 3) == 640 and packed_k(172, 2) == 192
    assert k_align(3) == 128 and k_align(4) == 64


def test_group_params_shorter_last_group():
    N, K, G = 6, 576, 128
    assert n_groups(K, G) == 5 and n_groups(172, 64) == 3 and n_groups(172, 4096) == 1
    s = torch.rand(N, 5, dtype=torch.float32)
    z = torch.rand(N, 5) * 15
    st, zt = prepare_group_params(s, z, K, G)
    assert st.shape == (5, N) and st.dtype == torch.float16 and st.is_contiguous()
    assert torch.equal(st, s.t().half()) and torch.equal(zt, z.t().half())
    st2, zt2 = prepare_group_params(s, None, K, G)
    assert zt2 is None
    with pytest.raises(WorkbenchError, match="5 groups"):
        prepare_group_params(torch.rand(N, 4), None, K, G)


def test_fp8_params():
    w = torch.randn(5, 40).to(torch.float8_e4m3fn)
    packed, s = prepare_fp8_params(w.view(torch.uint8), torch.rand(5, 1))
    assert torch.equal(packed, pack_codes(w.view(torch.uint8), 8)) and packed.shape == (5, 16)
    assert torch.equal(unpack_codes(packed, 8, 40).view(torch.float8_e4m3fn).float(), w.float())
    assert s.shape == (5,) and s.dtype == torch.float32
    with pytest.raises(WorkbenchError, match="one per output channel"):
        prepare_fp8_params(w.view(torch.uint8), torch.rand(4))


def test_bad_input_is_named():
    with pytest.raises(WorkbenchError, match="does not fit in 3 bits"):
        pack_codes(torch.full((2, 10), 8, dtype=torch.uint8), 3)
    with pytest.raises(WorkbenchError, match="bits=5"):
        pack_codes(torch.zeros(2, 10, dtype=torch.uint8), 5)
    with pytest.raises(WorkbenchError, match="uint8"):
        pack_codes(torch.zeros(2, 10, dtype=torch.int32), 4)
    with pytest.raises(WorkbenchError, match="K=100"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.int32), 4, 100)
