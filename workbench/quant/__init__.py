"""Pure-tensor quantization: specs, formats, algorithms (RTN, GPTQ, AWQ), packing, metrics."""
