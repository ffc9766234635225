"""ActivationCollector: forward pre-hooks that fold every quantizable linear's input into its statistics.

Shared by both collection modes of activations.py (whole-model forwards) and layerwise.py (one decoder
block at a time); it holds no loop of its own. Layers reading the very same input tensor (q/k/v, gate/up)
share one accumulator: a hook that receives the tensor object the previous hook just saw reuses it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from workbench.errors import WorkbenchError
from workbench.model.inventory import get_module, layer_inventory
from workbench.progress import Progress
from workbench.progress import progress_bar as bar
from workbench.stats.accumulator import ActivationStats, InputAccumulator

GramSink = Callable[[str, torch.Tensor], None]


class ActivationCollector:
    """Owns the accumulators and the hooks of one collection run.

    Use as a context manager: hooks are registered on enter and removed on exit, whatever happens.
    `set_tokens(ids, seq_offset)` tells the hooks which tokens the next forward carries ([b, L] ids).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        names: list[str],
        gram: bool = True,
        hist_bins: int = 256,
        top_tokens: int = 32,
    ):
        self.model = model
        self.names = list(names)
        self.gram = gram
        self.hist_bins, self.top_tokens = hist_bins, top_tokens
        self.acc: dict[str, InputAccumulator] = {}  # leader name -> accumulator
        self.leader: dict[str, str] = {}  # layer name -> leader name (itself when not shared)
        self._last: tuple[torch.Tensor, str] | None = None
        self._handles: list = []
        self._ids: torch.Tensor | None = None
        self._seq_offset = 0
        self.finished: dict[str, ActivationStats] = {}

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> ActivationCollector:
        try:
            for name in self.names:
                mod = get_module(self.model, name)
                self._handles.append(mod.register_forward_pre_hook(self._make_hook(name), with_kwargs=True))
        except BaseException:
            self.remove_hooks()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def _make_hook(self, name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            assert isinstance(x, torch.Tensor), f"layer '{name}' got no tensor input"
            self.observe(name, x)

        return hook

    # ------------------------------------------------------------------ accumulation
    def set_tokens(self, ids: torch.Tensor | None, seq_offset: int) -> None:
        """The token ids [b, L] of the next forward and the index of its first sequence."""
        self._ids, self._seq_offset = ids, seq_offset
        self._last = None

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Fold the input `x` [..., K] of layer `name` into its statistics."""
        if self._last is not None and self._last[0] is x:
            lead = self._last[1]
            prev = self.leader.setdefault(name, lead)
            assert prev == lead, f"layer '{name}' shared its input with '{prev}', now with '{lead}'"
            return
        prev = self.leader.setdefault(name, name)
        assert prev == name, f"layer '{name}' shared its input with '{prev}' before, not any more"
        self._last = (x, name)
        if name not in self.acc:
            self.acc[name] = InputAccumulator(
                int(x.shape[-1]), gram=self.gram, hist_bins=self.hist_bins, top_tokens=self.top_tokens
            )
        seqs = positions = token_ids = None
        ids = self._ids
        if ids is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(ids.shape):
            b, L = ids.shape
            seqs = torch.arange(b).repeat_interleave(L) + self._seq_offset
            positions = torch.arange(L).repeat(b)
            token_ids = ids.reshape(-1).cpu()
        self.acc[name].add(x, seqs, positions, token_ids)

    def finish(self, names: list[str], gram_sink: GramSink | None = None) -> None:
        """Finalize the statistics of `names` (moving them to the CPU and freeing device memory).

        With `gram_sink`, each leader's Gram is handed to `gram_sink(name, gram)` on its device (float64 on
        CPU, float32 on CUDA) and not kept in the statistics.
        """
        for name in names:
            lead = self.leader.get(name)
            if lead is None:
                raise WorkbenchError(f"layer '{name}' never ran during calibration (is it used by forward?)")
            if lead not in self.finished:
                acc = self.acc[lead]
                if gram_sink is not None and acc.gram_tensor() is not None:
                    gram_sink(lead, acc.gram_tensor())
                self.finished[lead] = acc.result(lead, keep_gram=gram_sink is None)
                del self.acc[lead]
            if lead != name:
                st = self.finished[lead]
                self.finished[name] = ActivationStats(**{**st.__dict__, "name": name, "shared_with": lead})


def quantizable_names(model: torch.nn.Module, layers: list[str] | None = None) -> list[str]:
    """The layers to hook: `layers` (checked) or every quantizable linear of the inventory."""
    known = [x.name for x in layer_inventory(model)]
    if layers is None:
        return known
    missing = [n for n in layers if n not in set(known)]
    if missing:
        raise WorkbenchError(f"layer '{missing[0]}' is not a quantizable linear of {type(model).__name__}")
    return list(layers)


def progress_bar(total: int, desc: str, progress: Progress):
    """A per-batch bar (`workbench.progress`: tqdm, silent, or a fraction callback)."""
    return bar(total, desc, progress, unit="batch")
