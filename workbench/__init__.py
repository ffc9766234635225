"""Quant Workbench: inspect a language model, plan mixed-precision quantization, run it on low-bit kernels.

The public API is imported lazily so that `import workbench` stays cheap and never pulls the UI packages.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys

__version__ = "0.1.0"

# Source checkout: kernels/ sits beside this package and ships as `workbench.kernels` (pyproject
# package-dir). setuptools' editable finder does not map a namespace folder under a package, so register
# it here (no code runs; installed wheels already have workbench/kernels and skip this).
_KERNELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
if (
    "workbench.kernels" not in sys.modules
    and os.path.isdir(_KERNELS_DIR)
    and not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels"))
):
    _spec = importlib.machinery.ModuleSpec("workbench.kernels", None, is_package=True)
    _spec.submodule_search_locations = [_KERNELS_DIR]
    kernels = sys.modules["workbench.kernels"] = importlib.util.module_from_spec(_spec)

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
    "Plan": "workbench.plan",
    "Rule": "workbench.plan",
    "plan_totals": "workbench.plan",
    "plan_diff": "workbench.plan",
    "fake_quantized": "workbench.simulate",
    "evaluate": "workbench.evaluate",
    "EvalResult": "workbench.evaluate",
    "SensitivityTable": "workbench.sensitivity",
    "sensitivity_scan": "workbench.sensitivity",
    "allocate": "workbench.allocate",
    "allocate_table": "workbench.allocate",
    "pareto_front": "workbench.allocate",
    "llama_cpp_tensor_types": "workbench.export",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def __dir__():
    return __all__
