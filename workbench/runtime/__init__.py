"""Quantized runtime: QuantLinear modules, apply_plan, save/load, fast decode, memory report.

Names are imported lazily (importing qlinear registers the `workbench::` custom ops).
"""

from __future__ import annotations

import importlib

_API = {
    "QuantLinear": "workbench.runtime.qlinear",
    "apply_plan": "workbench.runtime.apply",
    "ApplyReport": "workbench.runtime.apply",
    "save_quantized": "workbench.runtime.serialize",
    "load_quantized": "workbench.runtime.serialize",
    "StaticDecoder": "workbench.runtime.decode",
    "greedy_generate": "workbench.runtime.decode",
    "make_decoder": "workbench.runtime.decode",
    "FastDecoder": "workbench.runtime.fastpath",
    "step_breakdown": "workbench.runtime.profile",
    "model_memory": "workbench.runtime.memory",
    "MemoryReport": "workbench.runtime.memory",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'workbench.runtime' has no attribute {name!r}")
