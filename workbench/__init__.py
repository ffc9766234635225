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

# name -> module that defines it (what the notebooks and scripts use; nothing here imports the UI)
_API = {
    "WorkbenchError": "workbench.errors",
    # models, layers, text
    "load_model": "workbench.model.loading",
    "LoadedModel": "workbench.model.loading",
    "ModelDescription": "workbench.model.loading",
    "layer_inventory": "workbench.model.inventory",
    "LayerInfo": "workbench.model.inventory",
    "get_linear_weight": "workbench.model.inventory",
    "load_text": "workbench.model.data",
    "calibration_batches": "workbench.model.data",
    "eval_windows": "workbench.model.data",
    # quantization of one weight, and the format registry
    "QuantSpec": "workbench.quant.spec",
    "QuantizedWeight": "workbench.quant.api",
    "quantize_weight": "workbench.quant.api",
    "fake_quant": "workbench.quant.api",
    "FORMATS": "workbench.quant.registry",
    "format_of": "workbench.quant.registry",
    # inspection
    "inspect_model": "workbench.stats.inspection",
    "Inspection": "workbench.stats.inspection",
    "collect_activation_stats": "workbench.stats.activations",
    # plans
    "Plan": "workbench.plan.plan",
    "Rule": "workbench.plan.plan",
    "ResolvedPlan": "workbench.plan.plan",
    "plan_totals": "workbench.plan.plan",
    "plan_diff": "workbench.plan.plan",
    # plan version 2: activation specs and transforms
    "ActSpec": "workbench.quant.act",
    "fake_quant_act": "workbench.quant.act",
    "KVSpec": "workbench.quant.kvcache",
    "fake_quant_kv": "workbench.quant.kvcache",
    "KVLayerSpec": "workbench.plan.kv",
    "kv_cache_bytes": "workbench.plan.kv",
    "kv_quantized": "workbench.measure.kvsim",
    "kv_statistics": "workbench.stats.kv",
    "kv_sensitivity": "workbench.measure.kvallocate",
    "allocate_joint": "workbench.measure.kvallocate",
    "Hadamard": "workbench.plan.transforms",
    "Smooth": "workbench.plan.transforms",
    "apply_transforms": "workbench.transform.apply",
    "input_outliers": "workbench.stats.outliers",
    "compare_transform": "workbench.transform.compare",
    "scan_transformed": "workbench.measure.sensitivity_transformed",
    "allocate_candidates": "workbench.measure.sensitivity_transformed",
    "allocate_over_transforms": "workbench.measure.sensitivity_transformed",
    # measuring a plan
    "fake_quantized": "workbench.measure.simulate",
    "act_quantized": "workbench.measure.simulate",
    "calibration_grams": "workbench.measure.simulate",
    "evaluate": "workbench.measure.evaluate",
    "EvalResult": "workbench.measure.evaluate",
    "SensitivityTable": "workbench.measure.sensitivity",
    "sensitivity_scan": "workbench.measure.sensitivity",
    "allocate": "workbench.plan.allocate",
    "allocate_table": "workbench.plan.allocate",
    "pareto_front": "workbench.plan.allocate",
    "llama_cpp_tensor_types": "workbench.export.llama_cpp",
    "llama_cpp_export": "workbench.export.llama_cpp",
    "gguf_export": "workbench.export.gguf",
    "compressed_tensors_export": "workbench.export.compressed_tensors",
    "verify_plan": "workbench.measure.verify",
    "Verification": "workbench.measure.verify",
    "layer_report": "workbench.measure.layer_report",
    "LayerReport": "workbench.measure.layer_report",
    # running a plan on the low-bit kernels
    "apply_plan": "workbench.runtime.apply",
    "ApplyReport": "workbench.runtime.apply",
    "QuantLinear": "workbench.runtime.qlinear",
    "ActQuantLinear": "workbench.runtime.act_linear",
    "save_quantized": "workbench.runtime.serialize",
    "load_quantized": "workbench.runtime.serialize",
    "model_memory": "workbench.runtime.memory",
    "greedy_generate": "workbench.runtime.decode",
    "select_device": "workbench.runtime.decode",
    # models larger than the device: one decoder block at a time (issue 18)
    "SafetensorsSource": "workbench.streaming.source",
    "SyntheticSource": "workbench.streaming.source",
    "StreamedModel": "workbench.streaming.skeleton",
    "open_streamed": "workbench.streaming.open",
    "stream_inspect": "workbench.streaming.runs",
    "stream_proxy_scan": "workbench.streaming.runs",
    "stream_quantize": "workbench.streaming.quantize",
    "distributed_scan": "workbench.streaming.distributed",
    "distributed_inspect": "workbench.streaming.distributed",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def __dir__():
    return __all__
