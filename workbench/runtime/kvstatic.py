"""The quantized KV cache of the fast decoder: fixed buffers, written at a position held on the device.

`StaticKVSide(spec, H, D, capacity, dtype, device)` is one side (keys or values) of one block for one
sequence, laid out as `QuantKVSide` (workbench/runtime/kvcache.py; B = 1) so that `attn_kvq` reads it:

    codes   uint8 [1, H, capacity, D * bits / 8]   scale / lo fp16 (per token or per channel group)
    ring    [1, H, W, D] in the model dtype: position p in slot p % W, W = R + 1 (per token) or R + G
            (per channel: the R newest tokens plus the group not yet complete)

Every decode step is graph-capturable (no host sync, no Python branch on the position):
`write(x [H, D], pos [1])` puts the token into its ring slot, then re-quantizes the token (per token) or
the group of G tokens (per channel) that holds position pos - R, with the arithmetic of `QuantKVSide`
(`int_params` / `int_codes`, the same grouping), and writes its codes and scales with `index_copy_`. Until
that token / group has left the window the rewrite is of rows the kernel does not read as codes (positions
>= the quantized prefix); the last rewrite, when it leaves, is the complete one, so the codes equal what
`QuantKVSide.append` stores token by token. `fill(x [H, T, D])` stores a prompt at once.
Refused: fp8_e4m3 (the kernel reads integer codes), `_had` and `_pre` keys (simulation only).
"""

from __future__ import annotations

import os

import torch

from workbench.errors import WorkbenchError
from workbench.quant.kvcache import KVSpec, int_codes, int_dequant, int_params
from workbench.runtime.kvcache import QuantKVSide, pack_kv_codes, unpack_kv_codes

KERNEL_FORMATS = ("int2", "int4", "int8")


def static_reason(spec: KVSpec | str, head_dim: int) -> str | None:
    """Why the fast decoder cannot store `spec` (the simulation still can), or None."""
    spec = KVSpec.parse(spec)
    if spec.fmt not in KERNEL_FORMATS:
        return f"{spec}: the fast decoder stores {', '.join(KERNEL_FORMATS)} codes only"
    if spec.hadamard or spec.pre_rope:
        return f"{spec}: the fast decoder stores post-RoPE keys without _had"
    return spec.check(head_dim, "k")


class StaticKVSide(QuantKVSide):
    """One side of one block's quantized cache with a ring window (module docstring)."""

    def __init__(self, spec: KVSpec | str, H: int, D: int, capacity: int, dtype, device="cpu"):
        spec = KVSpec.parse(spec)
        reason = static_reason(spec, D)
        if reason:
            raise WorkbenchError(f"KV-cache spec {reason}")
        G = spec.group(D)
        capacity = -(-capacity // G) * G if spec.axis == "ch" else capacity
        super().__init__(spec, 1, H, D, capacity, device)
        self.R = spec.residual
        self.W = self.R + (G if spec.axis == "ch" else 1)
        self.ring = torch.zeros(1, H, self.W, D, dtype=dtype, device=device)
        self.span = G if spec.axis == "ch" else 1  # tokens re-quantized per step
        self.offsets = torch.arange(self.span, device=device)  # [span]

    # -------------------------------------------------------------- writing (graph-capturable)
    def write(self, x: torch.Tensor, pos: torch.Tensor) -> None:
        """Store token x [H, D] at position pos (int64 [1] on the device); see the module docstring.

        One fused Triton launch (kernels/kv_store.py) on CUDA and under TRITON_INTERPRET=1; else (on the
        CPU, or with WORKBENCH_KV_STORE=0) `write_ref`. tests/test_fast_kvq.py checks the two bit-exact;
        it passed on the H200 (2026-12-02, RESULTS, issue 17), where the fused write took the 4k whole step
        with an int8 cache from 87.8 to 135.4 tok/s.
        """
        fused_on_gpu = x.is_cuda and os.environ.get("WORKBENCH_KV_STORE", "1") != "0"
        if fused_on_gpu or os.environ.get("TRITON_INTERPRET") == "1":
            from workbench.kernels.kv_store import kernel_reason, kv_store

            if kernel_reason(x, self.spec.bits, self.G) is None:
                kv_store(
                    self.ring, self.codes, self.scale, self.lo, x, pos, self.R, self.spec.bits,
                    self.spec.axis == "ch", self.G,
                )  # fmt: skip
                return
        self.write_ref(x, pos)

    def write_ref(self, x: torch.Tensor, pos: torch.Tensor) -> None:
        """The torch twin of `write` (~30 small kernels per call; the store's reference arithmetic)."""
        self.ring.index_copy_(2, pos % self.W, x.to(self.ring.dtype)[None, :, None])
        first = (pos - self.R).clamp_min(0) // self.span * self.span  # [1] the due token / group start
        positions = first + self.offsets  # [span]
        rows = self.ring.index_select(2, positions % self.W).float()  # [1, H, span, D]
        self._store(rows, positions, first // self.span)

    def _store(self, x: torch.Tensor, positions: torch.Tensor, group: torch.Tensor) -> None:
        """Quantize x [1, H, span, D] (positions [span]) and write codes / scales with index_copy_."""
        spec, G, T = self.spec, self.G, x.shape[2]
        if spec.axis == "tok":
            rows = x.reshape(1, self.H, T, self.D // G, G)
        else:
            rows = x.reshape(1, self.H, T // G, G, self.D).transpose(-1, -2)
        scale, lo = int_params(rows, spec.bits, spec.sym)
        codes = int_codes(rows, spec.bits, scale, lo)
        at = positions if spec.axis == "tok" else group
        if spec.axis == "ch":
            codes = codes.transpose(-1, -2)
        self.scale.index_copy_(2, at, scale.squeeze(-1).half())
        if lo is not None:
            self.lo.index_copy_(2, at, lo.squeeze(-1).half())
        packed = pack_kv_codes(codes.reshape(1, self.H, T, self.D), spec.bits)
        self.codes.index_copy_(2, positions, packed)

    def fill(self, x: torch.Tensor) -> None:
        """Store a prompt x [H, T, D] at positions 0 .. T-1 (the state `write` would leave after T steps)."""
        T = x.shape[1]
        if T > self.capacity:
            raise WorkbenchError(f"KV cache full: {T} tokens > capacity {self.capacity}")
        x = x.to(self.ring.dtype)[None]  # [1, H, T, D]
        q = self.spec.quantized_prefix(T, self.D)
        if q:
            self._quantize(x[:, :, :q].float(), 0)
        lo = max(0, T - self.W)
        pos = torch.arange(lo, T, device=x.device)
        self.ring.index_copy_(2, pos % self.W, x[:, :, lo:])
        self.n, self.n_quantized = T, q

    # -------------------------------------------------------------- reading
    def kernel_args(self) -> dict:
        """This side as `attn_kvq_static` reads it (the length comes from the device)."""
        return {
            "codes": self.codes,
            "scale": self.scale,
            "lo": self.lo,
            "window": self.ring,
            "residual": self.R,
            "bits": self.spec.bits,
            "per_channel": self.spec.axis == "ch",
            "group": self.G,
        }

    def values(self, length: torch.Tensor) -> torch.Tensor:
        """float32 [1, H, capacity, D]: what a query at `length` tokens reads (slots >= length: garbage).

        The torch twin of the kernel's read: dequantized codes below the quantized prefix, the ring above.
        """
        spec, G = self.spec, self.G
        vals = unpack_kv_codes(self.codes, spec.bits).float()
        if spec.axis == "tok":
            rows = vals.reshape(1, self.H, self.capacity, self.D // G, G)
            deq = int_dequant(rows, spec.bits, self.scale[..., None].float(), _f(self.lo, -1))
        else:
            rows = vals.reshape(1, self.H, self.capacity // G, G, self.D)
            deq = int_dequant(rows, spec.bits, self.scale[:, :, :, None].float(), _f(self.lo, 3))
        deq = deq.reshape(1, self.H, self.capacity, self.D)
        p = torch.arange(self.capacity, device=self.codes.device)
        q = (length - self.R).clamp_min(0)
        q = q // G * G if spec.axis == "ch" else q
        ring = self.ring.float().index_select(2, p % self.W)
        return torch.where((p < q)[:, None], deq, ring)

    def allocated_bytes(self) -> int:
        """Bytes this side holds on the device (codes, scales, minima, ring): measured, not predicted."""
        ts = [self.codes, self.scale, self.ring] + ([self.lo] if self.lo is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def _f(lo: torch.Tensor | None, dim: int) -> torch.Tensor | None:
    return None if lo is None else lo.float().unsqueeze(dim)
