"""Per-block weight sources: where a streamed model's decoder blocks come from, one block at a time.

A `BlockSource` gives a transformers config, the resident tensors (embedding, final norm, output head: full
state-dict keys) and, on demand, the tensors of decoder block i (keys relative to the block, e.g.
`self_attn.q_proj.weight`) on a chosen device. Two implementations:
    SafetensorsSource   a Hugging Face checkpoint folder (`config.json` + `model.safetensors.index.json` and
                        its shards, or one `model.safetensors`); block i's tensors are read lazily with
                        `safetensors.safe_open`, nothing else is touched.
    SyntheticSource     a Llama-shaped model whose weights are generated deterministically per block
                        (seeded by the block index) on the target device: a 70B shape without a 140 GB disk.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.presets import LLAMA3_70B

BLOCK_PREFIX = "model.layers."


class BlockSource(ABC):
    """Where the weights of a streamed model come from (module docstring)."""

    config: object  # transformers PretrainedConfig
    name: str

    @property
    def n_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @abstractmethod
    def resident_state(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every tensor outside the decoder blocks (full state-dict keys)."""

    @abstractmethod
    def block_state(self, i: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors of decoder block i, keys relative to the block, on `device` in `dtype`."""

    @abstractmethod
    def block_bytes(self, i: int, dtype: torch.dtype) -> int:
        """Bytes block i takes once materialized in `dtype` (without reading it)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A stable identity of the weights (for result files and resumption)."""


# ---------------------------------------------------------------------- safetensors checkpoints
class SafetensorsSource(BlockSource):
    """A Hugging Face checkpoint folder in safetensors, sharded (`model.safetensors.index.json`) or not."""

    def __init__(self, folder: str | Path):
        from transformers import AutoConfig

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise WorkbenchError(f"{self.folder}: no config.json (not a Hugging Face checkpoint folder)")
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise WorkbenchError(f"{index}: not a safetensors index (no weight_map)") from None
        elif (self.folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(self.folder / "model.safetensors"), "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise WorkbenchError(f"{self.folder}: no model.safetensors.index.json or model.safetensors")
        missing = sorted({f for f in self.weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise WorkbenchError(f"{self.folder}: shard {missing[0]} named in the index is missing")
        self.config = AutoConfig.from_pretrained(str(self.folder))
        self.name = self.folder.name
        bad = [k for k in self.weight_map if k.startswith(BLOCK_PREFIX) and not k.split(".")[2].isdigit()]
        if bad:
            raise WorkbenchError(f"{self.folder}: tensor '{bad[0]}' is not inside a numbered decoder block")

    def _read(self, keys: list[str], strip: str, device, dtype) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for fname, ks in by_file.items():
            with safe_open(str(self.folder / fname), "pt") as f:
                for k in ks:
                    out[k[len(strip) :]] = f.get_tensor(k).to(device=device, dtype=dtype)
        return out

    def resident_state(self, device, dtype):
        return self._read([k for k in self.weight_map if not k.startswith(BLOCK_PREFIX)], "", device, dtype)

    def _block_keys(self, i: int) -> list[str]:
        if not 0 <= i < self.n_blocks:
            raise WorkbenchError(f"{self.folder}: decoder block {i} out of range (0..{self.n_blocks - 1})")
        prefix = f"{BLOCK_PREFIX}{i}."
        keys = [k for k in self.weight_map if k.startswith(prefix)]
        if not keys:
            raise WorkbenchError(f"{self.folder}: no tensors for decoder block {i} in the checkpoint")
        return keys

    def block_state(self, i, device, dtype):
        return self._read(self._block_keys(i), f"{BLOCK_PREFIX}{i}.", device, dtype)

    def block_bytes(self, i, dtype):
        from safetensors import safe_open

        n = 0
        keys = self._block_keys(i)
        for fname in sorted({self.weight_map[k] for k in keys}):
            with safe_open(str(self.folder / fname), "pt") as f:
                n += sum(math.prod(f.get_slice(k).get_shape()) for k in keys if self.weight_map[k] == fname)
        return n * torch.empty((), dtype=dtype).element_size()

    def fingerprint(self) -> str:
        h = hashlib.sha1(json.dumps(self.config.to_dict(), sort_keys=True, default=str).encode())
        for fname in sorted(set(self.weight_map.values())):
            p = self.folder / fname
            h.update(f"{fname}:{p.stat().st_size}".encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 16))
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------- synthetic Llama
def block_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Relative tensor name -> shape of one Llama decoder block of config `cfg`."""
    H, F = cfg.hidden_size, cfg.intermediate_size
    d = cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * d
    return {
        "input_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (H, H),
        "self_attn.k_proj.weight": (kv, H),
        "self_attn.v_proj.weight": (kv, H),
        "self_attn.o_proj.weight": (H, H),
        "post_attention_layernorm.weight": (H,),
        "mlp.gate_proj.weight": (F, H),
        "mlp.up_proj.weight": (F, H),
        "mlp.down_proj.weight": (H, F),
    }


def synthetic_tensor(shape: tuple[int, ...], seed: int, device, dtype, n_outliers: int = 4) -> torch.Tensor:
    """One deterministic tensor: a norm weight (1-D) near 1 with `n_outliers` channels at 8..24 (the
    massive-channel pattern of real LLM inputs), or a linear weight [N, K] ~ N(0, 1/K) with a Student-t
    like tail (1 in 4096 weights x8) and `n_outliers` input columns x4. Same seed, same device kind: same
    tensor."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if len(shape) == 1:
        w = 1.0 + 0.05 * torch.randn(shape, generator=gen, device=device)
        idx = torch.randint(0, shape[0], (n_outliers,), generator=gen, device=device)
        w[idx] = 8.0 + 16.0 * torch.rand(n_outliers, generator=gen, device=device)
        return w.to(dtype)
    N, K = shape
    w = torch.randn(shape, generator=gen, device=device).mul_(1.0 / math.sqrt(K))
    tail = torch.rand(shape, generator=gen, device=device) < 1.0 / 4096
    w = torch.where(tail, w * 8.0, w)
    cols = torch.randint(0, K, (n_outliers,), generator=gen, device=device)
    w[:, cols] *= 4.0
    return w.to(dtype)


class SyntheticSource(BlockSource):
    """A Llama-shaped model (`LLAMA3_70B` by default) generated per block on the fly (module docstring).

    Tensor t of block i is `synthetic_tensor(shape, seed * 1_000_003 + 1000 * i + t)`: block i does not
    depend on any other block, so it can be produced in any order, on any rank.
    """

    def __init__(self, shape: dict | None = None, seed: int = 0, name: str = "synthetic-llama3-70b"):
        from transformers import LlamaConfig

        self.shape = dict(shape or LLAMA3_70B)
        self.config = LlamaConfig(**self.shape)
        self.config.architectures = ["LlamaForCausalLM"]
        self.seed, self.name = int(seed), name

    def _seed(self, block: int, t: int) -> int:
        return self.seed * 1_000_003 + 1000 * (block + 1) + t

    def resident_state(self, device, dtype):
        V, H = self.config.vocab_size, self.config.hidden_size
        emb = synthetic_tensor((V, H), self._seed(-1, 0), device, torch.float32).mul_(0.02 * math.sqrt(H))
        out = {"model.embed_tokens.weight": emb.to(dtype)}
        out["model.norm.weight"] = synthetic_tensor((H,), self._seed(-1, 1), device, dtype)
        if not self.config.tie_word_embeddings:
            out["lm_head.weight"] = synthetic_tensor((V, H), self._seed(-1, 2), device, dtype)
        return out

    def block_state(self, i, device, dtype):
        if not 0 <= i < self.n_blocks:
            raise WorkbenchError(f"{self.name}: decoder block {i} out of range (0..{self.n_blocks - 1})")
        shapes = block_shapes(self.config)
        return {
            k: synthetic_tensor(s, self._seed(i, t), device, dtype) for t, (k, s) in enumerate(shapes.items())
        }

    def block_bytes(self, i, dtype):
        n = sum(math.prod(s) for s in block_shapes(self.config).values())
        return n * torch.empty((), dtype=dtype).element_size()

    def fingerprint(self) -> str:
        ident = json.dumps({"shape": self.shape, "seed": self.seed, "v": 1}, sort_keys=True)
        return hashlib.sha1(ident.encode()).hexdigest()[:16]
