"""Open a streamed model by name, and its calibration ids: the entry point of `--stream` in the CLI.

`open_streamed(model)` takes a Hugging Face checkpoint folder in safetensors (sharded or not), or
`synthetic` (the Llama-3-70B shape) / `synthetic-tiny` (2 blocks, hidden 256). `stream_batches` draws the
calibration windows from a text with the folder's tokenizer (`data.calibration_batches`), or seeded
uniform random token ids for a synthetic model, which has no tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.presets import LLAMA3_70B, TINY_LLAMA
from workbench.streaming.skeleton import StreamedModel
from workbench.streaming.source import SafetensorsSource, SyntheticSource

SYNTHETIC = {"synthetic": LLAMA3_70B, "synthetic-tiny": TINY_LLAMA}


def folder_tokenizer(folder: Path):
    """The workbench Tokenizer of a checkpoint folder (HF files, tokenizer/ or tokenizer.bin), or None."""
    from workbench.model.tokenizer import Tokenizer
    from workbench.runtime.serialize import load_tokenizer

    found = load_tokenizer(folder)
    if found is not None:
        return found
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return Tokenizer(AutoTokenizer.from_pretrained(str(folder)))
    return None


def open_streamed(
    model: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    memory_cap: int | None = None,
) -> tuple[StreamedModel, object]:
    """(StreamedModel, tokenizer or None) for a checkpoint folder or a synthetic shape (module docstring).

    dtype None: bfloat16 on CUDA, float32 on the CPU.
    """
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if model.split(":")[0] in SYNTHETIC:
        name, _, seed = model.partition(":")
        source = SyntheticSource(SYNTHETIC[name], seed=int(seed or 0), name=f"{name}:{seed or 0}")
        return StreamedModel(source, device, dtype, memory_cap), None
    folder = Path(model)
    if not folder.is_dir():
        raise WorkbenchError(
            f"--stream needs a safetensors checkpoint folder or {' / '.join(SYNTHETIC)}; got '{model}'"
        )
    return StreamedModel(SafetensorsSource(folder), device, dtype, memory_cap), folder_tokenizer(folder)


def stream_batches(sm: StreamedModel, tokenizer, text: str, n_seqs: int, seq_len: int, seed: int = 0):
    """Calibration ids [n_seqs, seq_len] and the settings that describe them."""
    from workbench.model.data import calibration_batches

    settings = {"text": text, "n_seqs": n_seqs, "seq_len": seq_len, "seed": seed}
    if tokenizer is None:
        if not isinstance(sm.source, SyntheticSource):
            raise WorkbenchError(f"{sm.source.name}: no tokenizer in the checkpoint folder to read '{text}'")
        gen = torch.Generator().manual_seed(seed)
        settings["text"] = "uniform random token ids"
        return torch.randint(0, sm.source.config.vocab_size, (n_seqs, seq_len), generator=gen), settings
    return calibration_batches(tokenizer, text, n_seqs, seq_len, seed), settings
