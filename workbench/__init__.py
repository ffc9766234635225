"""Quant Workbench: inspect a language model, plan mixed-precision quantization, run it on low-bit kernels.

The public API is imported lazily so that `import workbench` stays cheap and never pulls the UI packages.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "WorkbenchError": "workbench.errors",
    "load_model": "workbench.loading",
    "LoadedModel": "workbench.loading",
    "ModelDescription": "workbench.loading",
    "layer_inventory": "workbench.inventory",
    "LayerInfo": "workbench.inventory",
    "load_text": "workbench.data",
    "calibration_batches": "workbench.data",
    "eval_windows": "workbench.data",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def __dir__():
    return __all__
