"""The decoder base shared by both decode paths: DecodeResult, GraphDecoder (static input/output
tensors, one CUDA graph per step, optional torch.compile) and the model's activation dtype.

The HF-model decoder (StaticDecoder) lives in decode.py, the Llama-family fast path in fastpath.py; both
subclass GraphDecoder, so neither imports the other.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from workbench.errors import WorkbenchError

MODES = ("auto", "eager", "graph", "compile")


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


def model_dtype(model) -> torch.dtype:
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
