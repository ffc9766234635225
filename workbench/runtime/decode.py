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
import time
from dataclasses import asdict, dataclass, field

import torch

from workbench.errors import WorkbenchError

MODES = ("auto", "eager", "graph", "compile")
PATHS = ("auto", "fast", "hf")


@dataclass
class DecodeResult:
    """Tokens and timings of one greedy generation.

    tokens: generated ids (prompt excluded), cut after the first EOS when one is given.
    prefill_s: time of the prompt pass (and first token); decode_s: time of the remaining new tokens.
    decode_tokens_per_s: steps after the first token / decode_s (the number that matters for batch-1 decode).
    """

    tokens: list[int]
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    mode: str
    setup_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    path: str = "hf"

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    def to_json(self) -> dict:
        d = asdict(self)
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


def _make_cache(model, max_cache_len: int, device, dtype):
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    except TypeError:  # older signatures want batch size, device and dtype up front
        return StaticCache(
            config=model.config, max_batch_size=1, max_cache_len=max_cache_len, device=device, dtype=dtype
        )


def _model_dtype(model) -> torch.dtype:
    emb = model.get_input_embeddings()
    return emb.weight.dtype if emb is not None else next(model.parameters()).dtype


class GraphDecoder:
    """Greedy decoding of one sequence with static buffers and (on CUDA) the one-token step in a CUDA graph.

    Subclasses own the model state: `_prefill_logits(ids [1, T]) -> [1, V]` (fills the cache from slot 0),
    `_forward_step() -> [1, V]` (logits of self.tok at self.pos, cache updated in place) and
    `_reset_cache()`. This class owns the token / position buffers, the capture and the timing.
    """

    path = "?"

    def _setup(self, device: torch.device, mode: str, max_cache_len: int) -> None:
        if mode not in MODES:
            raise WorkbenchError(f"unknown decode mode '{mode}' (choose {', '.join(MODES)})")
        if mode == "auto":
            mode = "graph" if device.type == "cuda" else "eager"
        if mode in ("graph", "compile") and device.type != "cuda":
            raise WorkbenchError(f"decode mode '{mode}' needs the model on CUDA (it is on {device})")
        self.device, self.mode, self.max_cache_len = device, mode, int(max_cache_len)
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=device)  # [1, 1] current input token
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # [1] its position
        self.step_idx = torch.zeros(1, dtype=torch.long, device=device)  # [1] slot in self.out
        self.out = torch.zeros(self.max_cache_len, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._step_fn = self._step
        self.setup_s = 0.0
        self.notes: list[str] = []

    def _compile(self) -> None:
        """mode 'compile': default inductor mode over the step (subclasses may compile smaller parts)."""
        self._step_fn = torch.compile(self._step, fullgraph=False, dynamic=False)

    # ------------------------------------------------------------------ the one-token step
    def _step(self) -> None:
        """Consume self.tok at self.pos, write the argmax into self.out[step_idx], advance (all on device)."""
        logits = self._forward_step()
        nxt = logits[:, -1, :].argmax(dim=-1) if logits.dim() == 3 else logits.argmax(dim=-1)  # [1]
        self.tok.copy_(nxt.view(1, 1))
        self.out.index_copy_(0, self.step_idx, nxt)
        self.step_idx.add_(1)
        self.pos.add_(1)

    def _reset(self) -> None:
        self._reset_cache()
        self.pos.zero_()
        self.step_idx.zero_()
        self.tok.zero_()

    def _capture(self) -> None:
        """Warm up (Triton compiles, cache allocation) and capture the step in a CUDA graph."""
        t0 = time.perf_counter()
        if self.mode == "compile":
            self._compile()
        self._reset()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):
                self._step_fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self._step_fn()
        torch.cuda.synchronize()
        self._reset()
        self.setup_s = time.perf_counter() - t0

    def prepare(self) -> None:
        """Capture the step now (graph / compile modes) instead of at the first `generate`."""
        if self.mode in ("graph", "compile") and self.graph is None:
            self._capture()

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        """Reset, run the prompt ids [T] through the model and set up the first decode step."""
        self._reset()
        T = int(ids.numel())
        first = self._prefill_logits(ids[None, :]).argmax(dim=-1)  # [1]
        self.tok.copy_(first.view(1, 1))
        self.out[0] = first[0]
        self.step_idx.fill_(1)
        self.pos.fill_(T)

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, eos_token_id: int | None = None) -> DecodeResult:
        """Greedy-decode `max_new_tokens` after `prompt_ids` (list of ids or LongTensor [T] / [1, T])."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).to(self.device)
        T = int(ids.numel())
        if T == 0:
            raise WorkbenchError("empty prompt: give at least one token")
        if max_new_tokens < 1:
            raise WorkbenchError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if T + max_new_tokens > self.max_cache_len:
            raise WorkbenchError(
                f"prompt ({T}) + new tokens ({max_new_tokens}) exceed the cache length {self.max_cache_len}"
            )
        self.prepare()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.prefill(ids)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        tokens = self.out[:max_new_tokens].tolist()
        if eos_token_id is not None and eos_token_id in tokens:
            tokens = tokens[: tokens.index(eos_token_id) + 1]
        return DecodeResult(
            tokens=tokens,
            prompt_tokens=T,
            new_tokens=max_new_tokens,
            prefill_s=t1 - t0,
            decode_s=t2 - t1,
            mode=self.mode,
            setup_s=self.setup_s,
            notes=list(self.notes),
            path=self.path,
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
        self.dtype = _model_dtype(model)
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


def make_decoder(model, max_cache_len: int = 512, mode: str = "auto", path: str = "auto") -> GraphDecoder:
    """The decoder for `model`: "fast" (workbench.runtime.fastpath, Llama-family), "hf" (StaticDecoder),
    or "auto" (fast where the model is supported, else hf, with the reason in `.notes`)."""
    if path not in PATHS:
        raise WorkbenchError(f"unknown decode path '{path}' (choose {', '.join(PATHS)})")
    from workbench.runtime.fastpath import FastDecoder, fast_path_reason

    reason = fast_path_reason(model) if path != "hf" else None
    if path == "fast" and reason:
        raise WorkbenchError(f"the fast decode path cannot run this model: {reason}")
    if path == "hf" or reason:
        dec = StaticDecoder(model, max_cache_len=max_cache_len, mode=mode)
        if reason:
            dec.notes.append(f"fast path not used: {reason}")
        return dec
    return FastDecoder(model, max_cache_len=max_cache_len, mode=mode)


def greedy_generate(
    model,
    prompt_ids,
    max_new_tokens: int,
    *,
    mode: str = "auto",
    eos_token_id: int | None = None,
    max_cache_len: int | None = None,
    path: str = "auto",
) -> DecodeResult:
    """One-shot helper: build a decoder (`make_decoder`) sized for the request and generate."""
    n = len(prompt_ids) if not isinstance(prompt_ids, torch.Tensor) else int(prompt_ids.numel())
    L = max_cache_len or max(64, n + max_new_tokens)
    dec = make_decoder(model, max_cache_len=L, mode=mode, path=path)
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
