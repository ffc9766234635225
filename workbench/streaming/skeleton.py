"""StreamedModel: a transformers model whose decoder blocks live on the meta device until they are visited.

The model is built from the source's config on the meta device (no memory); the resident modules (embedding,
final norm, output head, rotary embedding) are materialized on the run device. `visit(i, block)` is the
context manager `stats.layerwise.collect_layerwise` runs each block's pass in: it checks that block i fits
the device (a one-line WorkbenchError naming the block, the bytes it needs and the bytes free otherwise),
loads its tensors from the source into the very same modules (so hooks registered by name keep working),
runs an optional `after(i, block)` while the weights are there, and sends the block back to meta. Peak
device memory: the residents, one block, the carried hidden states and the statistics of one block.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from workbench.errors import WorkbenchError
from workbench.streaming.source import BLOCK_PREFIX, BlockSource


def host_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def free_device_bytes(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None on the CPU: no limit checked)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None


class StreamedModel:
    """A Llama-family CausalLM with resident embedding/norm/head and decoder blocks materialized on demand.

    Args:
        source: where the weights come from (BlockSource).
        device: where the residents live and each block runs.
        dtype: the dtype of every weight and of the hidden states.
        memory_cap: bytes a block may take on the device (default: whatever is free on CUDA, no limit on
            the CPU); a smaller cap simulates a smaller device.
    """

    def __init__(self, source: BlockSource, device="cpu", dtype=torch.float32, memory_cap: int | None = None):
        from transformers import AutoModelForCausalLM

        self.source, self.device, self.dtype = source, torch.device(device), dtype
        self.memory_cap = memory_cap
        cfg = source.config
        if getattr(cfg, "model_type", None) not in ("llama", "mistral", "qwen2"):
            raise WorkbenchError(
                f"{source.name}: streaming supports Llama-family checkpoints, not model_type "
                f"'{getattr(cfg, 'model_type', None)}'"
            )
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        self.blocks = self.model.model.layers
        self.n_blocks = len(self.blocks)
        self._materialize_residents()
        self.peak_block_bytes = 0
        self.block_seconds: list[float] = []  # wall time of each visit (load, pass, after, free), in order
        self.after_seconds: list[float] = []  # of which the `after` step (the block's per-layer work)

    def _materialize_residents(self) -> None:
        state = self.source.resident_state(self.device, self.dtype)
        inner = self.model.model
        rot = getattr(inner, "rotary_emb", None)
        if rot is not None:  # its inv_freq buffer is computed, not stored: build it for real
            inner.rotary_emb = type(rot)(config=self.source.config).to(self.device)
        missing, unexpected = self.model.load_state_dict(state, strict=False, assign=True)
        bad = [k for k in missing if not k.startswith(BLOCK_PREFIX)]
        if getattr(self.source.config, "tie_word_embeddings", False):
            self.model.tie_weights()
            bad = [k for k in bad if k != "lm_head.weight"]
        if bad or unexpected:
            raise WorkbenchError(
                f"{self.source.name}: resident tensors do not match the architecture (missing {bad[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        still_meta = [
            n
            for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
            if t.is_meta and not n.startswith(BLOCK_PREFIX)
        ]
        assert not still_meta, f"resident tensors left on meta: {still_meta[:3]}"

    # ------------------------------------------------------------------ blocks
    def check_fits(self, i: int) -> int:
        """Bytes block i needs; WorkbenchError when more than the cap or the free device memory."""
        need = self.source.block_bytes(i, self.dtype)
        free = free_device_bytes(self.device)
        if self.memory_cap is not None:
            free = self.memory_cap if free is None else min(free, self.memory_cap)
        if free is not None and need > free:
            raise WorkbenchError(
                f"decoder block {i} of {self.source.name} does not fit {self.device}: it needs "
                f"{need:,} bytes, {free:,} free"
            )
        return need

    def load_block(self, i: int) -> torch.nn.Module:
        """Materialize block i in place (same module objects) on the device."""
        self.peak_block_bytes = max(self.peak_block_bytes, self.check_fits(i))
        state = self.source.block_state(i, self.device, self.dtype)
        block = self.blocks[i]
        try:
            block.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise WorkbenchError(
                f"{self.source.name}: decoder block {i}: {str(exc).splitlines()[0]}"
            ) from None
        return block

    def free_block(self, i: int) -> None:
        """Send block i back to the meta device (its memory is released)."""
        self.blocks[i].to("meta")

    def visit_factory(self, after: Callable[[int, torch.nn.Module], None] | None = None):
        """A `visit(i, block)` for collect_layerwise: load block i, run the pass, `after(i, block)`, free."""

        @contextmanager
        def visit(i: int, block: torch.nn.Module):
            assert block is self.blocks[i], "visit called with a block of another model"
            t0 = time.perf_counter()
            self.load_block(i)
            try:
                yield
                t1 = self._now()
                if after is not None:
                    after(i, block)
                self.after_seconds.append(self._now() - t1)
            finally:
                self.free_block(i)
                self.block_seconds.append(self._now() - t0)

        return visit

    def _now(self) -> float:
        """perf_counter after the device's queued work (two host syncs per block: the real wall times)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def block_layers(self, names: list[str]) -> list[list[str]]:
        """`names` split by decoder block (index i: the names inside block i)."""
        out: list[list[str]] = [[] for _ in range(self.n_blocks)]
        for n in names:
            if n.startswith(BLOCK_PREFIX):
                out[int(n[len(BLOCK_PREFIX) :].split(".", 1)[0])].append(n)
        return out


def describe(sm: StreamedModel):
    """A ModelDescription of a streamed model (parameters counted from the config's shapes)."""
    from workbench.model.loading import ModelDescription

    cfg = sm.source.config
    n_params = sum(p.numel() for p in sm.model.parameters())  # meta blocks count too (shapes only)
    return ModelDescription(
        name=sm.source.name,
        architecture=(getattr(cfg, "architectures", None) or ["LlamaForCausalLM"])[0],
        n_params=int(n_params),
        dtype=str(sm.dtype).replace("torch.", ""),
        source=str(getattr(sm.source, "folder", sm.source.name)),
        origin=f"streamed block by block ({type(sm.source).__name__})",
        n_layers=sm.n_blocks,
        hidden_size=int(cfg.hidden_size),
        vocab_size=int(cfg.vocab_size),
        max_context=int(getattr(cfg, "max_position_embeddings", 0) or 0),
        fingerprint=sm.source.fingerprint(),
    )
