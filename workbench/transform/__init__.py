"""Rewriting a model before quantization: rotations, SmoothQuant, a plan's transforms applied."""
