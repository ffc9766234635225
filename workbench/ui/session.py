"""One session's model: the process-wide shared LoadedModel, this session's private copy, and its lock.

A loaded model is shared by every session of one server process (read-only: the inventory, the weights of
the distribution charts). Jobs that run the model (statistics hooks, fake quantization, generation) use a
private deep copy per session, made on first need, so two browser tabs never race on one nn.Module; the
session's lock lets one model-running job at a time use it. The chat's quantized copy is cached here too,
keyed by the plan it was made from.

`ModelSession` is what the job functions of `workbench/ui/tasks.py` receive; the state holds one per loaded
model (`WorkbenchState.session`) and replaces it on every load.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from typing import Any

Report = Callable[[float | None, str | None], None]  # a job's ctx.report(fraction, text)

_SHARED: dict[str, Any] = {}
_SHARED_LOCK = threading.Lock()


def shared_model(source: str, report: Report | None = None):
    """Load `source` once per process (later sessions reuse the same LoadedModel)."""
    from workbench.model.loading import load_model

    with _SHARED_LOCK:
        if source not in _SHARED:
            if report is not None:
                report(0.1, f"loading {source} (the default model converts once, ~20 s, then is cached)")
            _SHARED[source] = load_model(source, progress=False)
        return _SHARED[source]


class ModelSession:
    """The shared model of one session, its private copy (made on first use) and the lock over both."""

    def __init__(self, loaded):
        self.loaded = loaded
        self._lock = threading.Lock()
        self._private = None
        self._quantized: tuple[str, Any, Any] | None = None  # (plan key, quantized copy, ApplyReport)

    @contextlib.contextmanager
    def use(self, report: Report | None = None) -> Iterator[Any]:
        """Hold the session's lock and yield the private LoadedModel (copied on first use)."""
        if report is not None:
            report(0.0, "waiting for the model")
        with self._lock:
            yield self._private_copy()

    def _private_copy(self):
        from workbench.model.loading import LoadedModel

        if self._private is None:
            base = self.loaded
            self._private = LoadedModel(
                model=copy.deepcopy(base.model), tokenizer=base.tokenizer, description=base.description
            )
        return self._private

    def quantized(self, key: str, build: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        """(model, ApplyReport) for the plan `key`: the cached copy, or `build()` (call under `use()`)."""
        assert self._lock.locked(), "ModelSession.quantized is called inside use()"
        if self._quantized is None or self._quantized[0] != key:
            self._quantized = (key, *build())
        return self._quantized[1], self._quantized[2]
