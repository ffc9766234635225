"""Quantized runtime: QuantLinear modules, apply_plan, save/load, fast decode."""
