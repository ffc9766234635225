"""Greedy decoding: static KV cache + one CUDA graph per token (the HF path; the fast path: fastpath.py).

Plain `model.generate` runs the one-token step eagerly: for a 32-block Llama that is ~1,000 small kernel
launches per token, each paying Python and launch overhead, plus a dynamic cache that grows with `torch.cat`.
At batch 1 the GPU then sits idle most of the time (measured on an H100: benchmarks/RESULTS.md). The decoder
here removes that per-token overhead the way gpt-fast does (https://github.com/pytorch-labs/gpt-fast):

* a transformers `StaticCache` (fixed-size K/V buffers, updated in place), a fixed-size 4-D attention mask
  computed on the device from a position tensor, and static input / output tensors;
* the whole one-token step (embedding -> blocks -> lm_head -> argmax -> bookkeeping) is captured once in a
  CUDA graph (`mode="graph"`), optionally after `torch.compile` fuses the small element-wise kernels
  (`mode="compile"`); each new token is then a single `graph.replay()` with no host synchronisation until the
  end. The low-bit layers enter the compiled graph as opaque custom ops (see qlinear.py).
* `mode="eager"` runs the same static-cache step in a Python loop (the CPU path, and the baseline that shows
  where the eager time goes).

Prefill runs once, eagerly, on the whole prompt. Works with transformers 5.x (5.17 and 5.23 tested): the
static cache tracks its own write position; `cache_position` is passed when the model's forward names it.
"""

from __future__ import annotations

import inspect

import torch

from workbench.errors import WorkbenchError
from workbench.runtime.graph import DecodeResult, GraphDecoder, model_dtype

PATHS = ("auto", "fast", "hf")


def _make_cache(model, max_cache_len: int, device, dtype):
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    except TypeError:  # older signatures want batch size, device and dtype up front
        return StaticCache(
            config=model.config, max_batch_size=1, max_cache_len=max_cache_len, device=device, dtype=dtype
        )


class StaticDecoder(GraphDecoder):
    """The Hugging Face model itself behind a transformers StaticCache (the reference path).

    Args:
        model: a transformers CausalLM (Llama-style; sdpa or eager attention).
        max_cache_len: prompt + new tokens must fit.
        mode: "auto" (graph on CUDA, eager on CPU), "eager", "graph" or "compile".
    """

    path = "hf"

    def __init__(self, model, max_cache_len: int = 512, mode: str = "auto"):
        self.model = model
        self._setup(next(model.parameters()).device, mode, max_cache_len)
        self.dtype = model_dtype(model)
        impl = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
        if impl not in ("sdpa", "eager"):
            raise WorkbenchError(f"StaticDecoder supports sdpa or eager attention, not '{impl}'")
        self.bool_mask = impl == "sdpa"
        self.pass_cache_position = "cache_position" in inspect.signature(model.forward).parameters
        self.cache = _make_cache(model, self.max_cache_len, self.device, self.dtype)
        self.arange = torch.arange(self.max_cache_len, device=self.device)  # [L]

    def _mask(self, q_pos: torch.Tensor) -> torch.Tensor:
        """Attention mask [1, 1, q, L] for queries at positions q_pos [q]: key j visible iff j <= q_pos."""
        keep = self.arange[None, :] <= q_pos[:, None]  # [q, L]
        if self.bool_mask:
            return keep[None, None]
        neg = torch.finfo(self.dtype).min
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(keep, zero, torch.full((), neg, dtype=self.dtype, device=self.device))[None, None]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """logits [1, q, V] for ids [1, q] at positions [q] (cache updated in place)."""
        kw = dict(
            input_ids=ids,
            position_ids=positions[None, :],
            attention_mask=self._mask(positions),
            past_key_values=self.cache,
            use_cache=True,
        )
        if self.pass_cache_position:
            kw["cache_position"] = positions
        return self.model(**kw).logits

    def _forward_step(self) -> torch.Tensor:
        return self._forward(self.tok, self.pos)

    def _prefill_logits(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        return self._forward(ids, torch.arange(T, device=self.device))[:, -1, :]

    def _reset_cache(self) -> None:
        self.cache.reset()


def make_decoder(
    model, max_cache_len: int = 512, mode: str = "auto", path: str = "auto", kv: dict | None = None
) -> GraphDecoder:
    """The decoder for `model`: "fast" (workbench.runtime.fastpath, Llama-family), "hf" (StaticDecoder),
    or "auto" (fast where the model is supported, else hf, with the reason in `.notes`).

    kv: `ResolvedPlan.kv` ({attention module: KVLayerSpec}); only the fast path stores a quantized cache,
    so a plan with K/V specs on a model or path it cannot run is refused (the simulation still runs it)."""
    if path not in PATHS:
        raise WorkbenchError(f"unknown decode path '{path}' (choose {', '.join(PATHS)})")
    from workbench.runtime.fastpath import FastDecoder, fast_path_reason

    reason = fast_path_reason(model) if path != "hf" else None
    quant_kv = any(s.k is not None or s.v is not None for s in (kv or {}).values())
    if quant_kv and (path == "hf" or reason):
        why = reason or "path 'hf' keeps a bf16 StaticCache"
        raise WorkbenchError(f"the plan's K/V cache specs need the fast decode path: {why}")
    if path == "fast" and reason:
        raise WorkbenchError(f"the fast decode path cannot run this model: {reason}")
    if path == "hf" or reason:
        dec = StaticDecoder(model, max_cache_len=max_cache_len, mode=mode)
        if reason:
            dec.notes.append(f"fast path not used: {reason}")
        return dec
    return FastDecoder(model, max_cache_len=max_cache_len, mode=mode, kv=kv)


def greedy_generate(
    model,
    prompt_ids,
    max_new_tokens: int,
    *,
    mode: str = "auto",
    eos_token_id: int | None = None,
    max_cache_len: int | None = None,
    path: str = "auto",
    kv: dict | None = None,
) -> DecodeResult:
    """One-shot helper: build a decoder (`make_decoder`, `kv` = a plan's K/V specs) sized for the request
    and generate."""
    n = len(prompt_ids) if not isinstance(prompt_ids, torch.Tensor) else int(prompt_ids.numel())
    L = max_cache_len or max(64, n + max_new_tokens)
    dec = make_decoder(model, max_cache_len=L, mode=mode, path=path, kv=kv)
    return dec.generate(prompt_ids, max_new_tokens, eos_token_id)


NO_CUDA_MESSAGE = (
    "no CUDA device found: running on the CPU with the torch reference path (same math, much "
    "slower; the Triton kernels need an NVIDIA GPU)"
)


def select_device(requested: str = "auto") -> tuple[torch.device, str | None]:
    """The device to run on and a message for the user (None when nothing needs saying).

    "auto" picks CUDA when available and otherwise the CPU with NO_CUDA_MESSAGE; "cuda" without a device
    raises WorkbenchError; "cpu" is always honoured.
    """
    if requested not in ("auto", "cpu", "cuda") and not requested.startswith("cuda:"):
        raise WorkbenchError(f"unknown device '{requested}' (choose auto, cpu or cuda)")
    if requested == "cpu":
        return torch.device("cpu"), None
    if torch.cuda.is_available():
        return torch.device("cuda" if requested == "auto" else requested), None
    if requested == "auto":
        return torch.device("cpu"), NO_CUDA_MESSAGE
    raise WorkbenchError(f"--device {requested}: no CUDA device is available (use --device auto or cpu)")
