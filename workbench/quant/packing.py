"""Bit packing of integer weight codes: the one layout the low-bit kernels read.

Input (the quant-core contract): ``codes`` uint8 ``[N, K]`` (N = out features, K = in features), every
value ``< 2**bits``; ``scales`` / ``zeros`` ``[N, n_groups]`` with groups of G along K from column 0 and a
shorter last group when G does not divide K; ``zeros is None`` means symmetric (fixed zero
``2**(bits-1)``).  Dequantization: ``W_hat[n, k] = (codes[n, k] - zeros[n, k // G]) * scales[n, k // G]``.

Layout (``LAYOUT_VERSION = 1``)
-------------------------------
* K is padded with zero codes up to ``Kp = packed_k(K, bits)``, a multiple of ``k_align(bits)``
  (64 for 2/4/8 bits, 128 for 3 bits).  This makes every packed row a multiple of 16 bytes, so the
  kernels can use 16-byte loads, and every 3-bit plane a whole number of words.  Pad codes are 0; the
  kernels mask the activations beyond K, so padding never changes a result.
* Orientation: row-major ``[N, words]`` int32 — one output channel per row, K contiguous.  The GEMV
  kernel reduces along K inside a thread (16-byte loads along K, warps over rows), the GEMM kernel
  unpacks a ``[BLOCK_N, BLOCK_K]`` tile and feeds ``tl.dot`` with its transpose.
* Codes are packed in chunks of 32 consecutive columns (``CHUNK = 32``; a plane of width b stores a
  chunk in ``b`` words).  Inside a chunk, column ``j * b + w`` (w in [0, b), j in [0, 32/b)) is slot j
  (bits ``j*b .. j*b+b-1``, LSB first) of the chunk's word w.  So the kernels find the activations of
  slot j of neighbouring words in neighbouring columns (vector loads of x), and a chunk never straddles
  a group (group sizes are multiples of 32).
* bits in {2, 4, 8}: ``packed`` is int32 ``[N, Kp * bits / 32]``; column k of row n is in word
  ``(k // 32) * bits + (k % 32) % bits``, slot ``(k % 32) // bits``.
* bits = 3, exactly 3 bits per weight as two planes in one row: ``packed`` is int32 ``[N, 3 * Kp / 32]``;
  words ``[0, Kp/16)`` are the 2-bit plane (``code & 3``, laid out exactly like bits=2), the last
  ``Kp/32`` words ``[Kp/16, 3*Kp/32)`` are the 1-bit plane (``code >> 2``): the high bit of the code in
  slot j of low-plane word L is bit ``(L % 2) * 16 + j`` of word ``Kp/16 + L // 2`` (one 1-bit word per
  chunk; bit ``w * 16 + j`` for column ``chunk * 32 + 2 * j + w``).
* Word values are the two's-complement int32 view of the unsigned 32-bit pattern.

Scales and zeros for the kernels (``prepare_group_params``): transposed to ``[n_groups, N]`` contiguous
fp16 (one coalesced row of N per group), not padded (kernels mask groups >= n_groups); zeros ``None`` for
symmetric.  FP8 E4M3 weights: the uint8 bit patterns ``[N, K]`` are packed exactly like 8-bit codes,
with an fp32 per-output-channel scale ``[N]`` (``prepare_fp8_params``).

Storage bytes (what the runtime keeps on the GPU):
* packed weights: ``N * Kp * bits / 8``
* scales: ``2 * N * n_groups`` (fp16); zeros: ``2 * N * n_groups`` (fp16, asymmetric only)
* FP8: ``N * Kp`` bytes of patterns (the 8-bit layout) + ``4 * N`` scales.
(``packed_nbytes`` returns the first; e.g. int4 g128 asym on 4096 x 14336: 29,360,128 B of codes plus
917,504 B of scales and 917,504 B of zeros = 4.25 bits per weight.)
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError

LAYOUT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)


def k_align(bits: int) -> int:
    """Multiple that K is padded to inside the packed layout (64, or 128 for 3 bits)."""
    _check_bits(bits)
    return 128 if bits == 3 else 64


def packed_k(K: int, bits: int) -> int:
    """Padded K (``Kp``) of the packed layout for ``K`` input features."""
    a = k_align(bits)
    return ((K + a - 1) // a) * a


def packed_words(K: int, bits: int) -> int:
    """Number of int32 words per packed row."""
    return packed_k(K, bits) * bits // 32


def packed_nbytes(N: int, K: int, bits: int) -> int:
    """Bytes of the packed code tensor for an [N, K] weight."""
    return N * packed_words(K, bits) * 4


def n_groups(K: int, group_size: int) -> int:
    """Groups along K with a shorter last group (per-channel: pass group_size >= K)."""
    return max(1, math.ceil(K / group_size))


def codes_per_word(bits: int) -> int:
    """Columns of K that one int32 word of the packed row covers: 32 // bits, and 16 for 3 bits (the 2-bit
    low plane, which sets the word grid; its 1-bit plane adds a word per two low words)."""
    _check_bits(bits)
    return 16 if bits == 3 else 32 // bits


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise WorkbenchError(f"packing: bits={bits} has no packed layout; supported: {SUPPORTED_BITS}")


def _to_int32(u: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)


CHUNK = 32  # columns per chunk; a plane of width b stores a chunk in b words


def _pack_plane(vals: torch.Tensor, width: int) -> torch.Tensor:
    """Pack ``vals`` [N, Kp] (each < 2**width, Kp % 32 == 0) into int32 words [N, Kp*width/32].

    Chunk-interleaved: column ``c*32 + j*width + w`` goes to slot j of word ``c*width + w``.
    """
    per = 32 // width
    N, Kp = vals.shape
    v = vals.to(torch.int64).view(N, Kp // CHUNK, per, width)  # [N, chunk, slot j, word w]
    shifts = (torch.arange(per, device=vals.device, dtype=torch.int64) * width)[:, None]
    words = (v << shifts).sum(dim=2)  # [N, chunk, w]: slots do not overlap, so sum == or
    return _to_int32(words.reshape(N, Kp * width // 32))


def _unpack_plane(words: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of ``_pack_plane``: int32 [N, W] -> int64 [N, W * 32/width]."""
    per = 32 // width
    N, W = words.shape
    u = (words.to(torch.int64) & 0xFFFFFFFF).view(N, W // width, 1, width)  # [N, chunk, 1, w]
    shifts = (torch.arange(per, device=words.device, dtype=torch.int64) * width)[:, None]
    return ((u >> shifts) & ((1 << width) - 1)).reshape(N, W * per)  # [N, chunk, j, w] -> columns


def _hi_order(hi: torch.Tensor, N: int, Kp: int) -> torch.Tensor:
    """3-bit high bits reordered so that column ``c*32 + 2j + w`` lands on bit ``w*16 + j`` of word c."""
    return hi.view(N, Kp // CHUNK, 16, 2).transpose(2, 3).reshape(N, Kp)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes into the kernel layout (see module docstring).

    Args:
        codes: uint8 [N, K], every value < 2**bits.
        bits: 2, 3, 4 or 8.
    Returns:
        int32 [N, packed_words(K, bits)], contiguous, on the device of ``codes``.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise WorkbenchError(
            f"packing: codes must be uint8 [N, K], got {codes.dtype} of shape {tuple(codes.shape)}"
        )
    N, K = codes.shape
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise WorkbenchError(f"packing: code {int(codes.max())} does not fit in {bits} bits (shape {N}x{K})")
    Kp = packed_k(K, bits)
    padded = torch.zeros(N, Kp, dtype=torch.uint8, device=codes.device)
    padded[:, :K] = codes
    if bits == 3:
        lo = _pack_plane(padded & 3, 2)  # [N, Kp/16]
        hi = _pack_plane(_hi_order(padded >> 2, N, Kp), 1)  # [N, Kp/32]
        return torch.cat([lo, hi], dim=1).contiguous()
    return _pack_plane(padded, bits).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: int32 [N, packed_words(K, bits)] -> uint8 [N, K]."""
    _check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != packed_words(K, bits):
        raise WorkbenchError(
            f"packing: expected int32 [N, {packed_words(K, bits)}] for K={K} at {bits} bits, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    Kp = packed_k(K, bits)
    if bits == 3:
        lo = _unpack_plane(packed[:, : Kp // 16], 2)
        hi = _unpack_plane(packed[:, Kp // 16 :], 1)
        hi = hi.view(packed.shape[0], Kp // CHUNK, 2, 16).transpose(2, 3).reshape(packed.shape[0], Kp)
        vals = lo | (hi << 2)
    else:
        vals = _unpack_plane(packed, bits)
    return vals[:, :K].to(torch.uint8).contiguous()


def prepare_group_params(
    scales: torch.Tensor, zeros: torch.Tensor | None, K: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales / zeros [N, n_groups] -> kernel form: fp16 [n_groups, N] contiguous (zeros None if symmetric).

    Args:
        scales: [N, n_groups] float (any float dtype).
        zeros: [N, n_groups] float zero points, or None (symmetric, zero 2**(bits-1)).
        K: input features; group_size: G (per-channel: G >= K, one group).
    """
    if scales.dim() != 2:
        raise WorkbenchError(f"packing: scales must be [N, n_groups], got shape {tuple(scales.shape)}")
    ng = n_groups(K, group_size)
    if scales.shape[1] != ng:
        raise WorkbenchError(
            f"packing: scales {tuple(scales.shape)} need {ng} groups for K={K}, group_size={group_size}"
        )
    s_t = scales.t().to(torch.float16).contiguous()
    z_t = None
    if zeros is not None:
        if zeros.shape != scales.shape:
            raise WorkbenchError(f"packing: zeros {tuple(zeros.shape)} != scales {tuple(scales.shape)}")
        z_t = zeros.t().to(torch.float16).contiguous()
    return s_t, z_t


def prepare_fp8_params(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 patterns uint8 [N, K] and scales [N] or [N, 1] -> (packed int32 [N, Kp/4], fp32 [N]).

    The bit patterns are packed exactly like 8-bit integer codes (``pack_codes(codes, 8)``).
    """
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise WorkbenchError(
            f"packing: fp8 codes must be uint8 [N, K], got {codes.dtype} {tuple(codes.shape)}"
        )
    if scales.numel() != codes.shape[0]:
        raise WorkbenchError(
            f"packing: fp8 scales must be one per output channel ({codes.shape[0]}), "
            f"got {tuple(scales.shape)}"
        )
    return pack_codes(codes, 8), scales.reshape(-1).to(torch.float32).contiguous()
