"""One tokenizer interface for every model source (Hugging Face tokenizers and llama2.c's BPE).

Everything in the workbench encodes and decodes through `Tokenizer`, so statistics, evaluation and chat do
not care where the model came from.
"""

from __future__ import annotations

from typing import Any


class Tokenizer:
    """Wraps a Hugging Face tokenizer or a `Llama2cTokenizer` behind encode/decode/prompt."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.is_hf = hasattr(inner, "apply_chat_template")

    @property
    def bos_token_id(self) -> int | None:
        return self.inner.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.inner.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.inner) if self.is_hf else self.inner.vocab_size

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.inner, "chat_template", None))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; `add_bos` prepends the BOS token when the tokenizer has one."""
        if self.is_hf:
            ids = self.inner.encode(text, add_special_tokens=False)
            if add_bos and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            return list(ids)
        return self.inner.encode(text, add_bos=add_bos)

    def decode(self, ids) -> str:
        if self.is_hf:
            return self.inner.decode(list(ids), skip_special_tokens=True)
        return self.inner.decode(ids)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Ids for a user prompt: the chat template when the model has one, else BOS + text."""
        if self.is_hf and self.has_chat_template:
            out = self.inner.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(out, dict) or hasattr(out, "keys"):
                out = out["input_ids"]
            return list(out)
        return self.encode(prompt, add_bos=True)
