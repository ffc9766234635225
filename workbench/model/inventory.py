"""The layer inventory: every quantizable linear layer of a model with its name, block, role and shape.

Works for Llama-family models (nn.Linear) and GPT-2-style models (transformers' Conv1D, whose weight is
stored [in, out]). A weight shared with another parameter (lm_head tied to the embeddings) is flagged.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from workbench.errors import WorkbenchError

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "lm_head", "other")
_ROLE_BY_NAME = {
    "q_proj": "q",
    "wq": "q",
    "query": "q",
    "k_proj": "k",
    "wk": "k",
    "key": "k",
    "v_proj": "v",
    "wv": "v",
    "value": "v",
    "o_proj": "o",
    "wo": "o",
    "out_proj": "o",
    "gate_proj": "gate",
    "w1": "gate",
    "up_proj": "up",
    "w3": "up",
    "c_fc": "up",
    "fc1": "up",
    "down_proj": "down",
    "w2": "down",
    "fc2": "down",
    "lm_head": "lm_head",
    "embed_out": "lm_head",
}
_BLOCK = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable linear layer."""

    name: str
    block: int | None
    role: str
    out_features: int
    in_features: int
    n_params: int
    tied: bool
    kind: str  # "linear" | "conv1d"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def to_dict(self) -> dict:
        return asdict(self)


def is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_quantizable(module: torch.nn.Module) -> bool:
    """nn.Linear or GPT-2 Conv1D with a 2-D weight."""
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def get_linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a transposed view for Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def _role(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "c_proj":  # GPT-2: attn.c_proj is the output projection, mlp.c_proj the down projection
        return "down" if ".mlp." in f".{name}" else "o"
    if leaf == "dense" and "attention" in name:
        return "o"
    return _ROLE_BY_NAME.get(leaf, "other")


def layer_inventory(model: torch.nn.Module) -> list[LayerInfo]:
    """List the quantizable linear layers in module order.

    Raises:
        WorkbenchError: the model has no linear layers.
    """
    # named_parameters() dedups tied weights by default: count every use of each storage
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[p.data_ptr()] = uses.get(p.data_ptr(), 0) + 1
    layers = []
    for name, mod in model.named_modules():
        if not is_quantizable(mod):
            continue
        w = get_linear_weight(mod)
        m = _BLOCK.search(f".{name}.")
        layers.append(
            LayerInfo(
                name=name,
                block=int(m.group(1)) if m else None,
                role=_role(name),
                out_features=int(w.shape[0]),
                in_features=int(w.shape[1]),
                n_params=int(w.numel()),
                tied=uses.get(mod.weight.data_ptr(), 1) > 1,
                kind="conv1d" if is_conv1d(mod) else "linear",
            )
        )
    if not layers:
        raise WorkbenchError(f"{type(model).__name__} has no linear layers to quantize")
    return layers


def layers_of(model_or_layers) -> list[LayerInfo]:
    """The layer inventory of a model, of a LoadedModel (`.model`), or a list of LayerInfo as it is."""
    if isinstance(model_or_layers, (list, tuple)) and all(isinstance(x, LayerInfo) for x in model_or_layers):
        return list(model_or_layers)
    model = model_or_layers
    if not isinstance(model, torch.nn.Module):  # a LoadedModel (a CausalLM has its own `.model`)
        model = getattr(model, "model", model)
    if not isinstance(model, torch.nn.Module):
        raise WorkbenchError(
            f"expected a model, a loaded model or a list of LayerInfo, got {type(model_or_layers).__name__}"
        )
    return layer_inventory(model)


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The submodule called `name`, with an error naming it when absent."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise WorkbenchError(f"layer '{name}' not found in {type(model).__name__}") from None
