"""Writing a plan for other tools: llama.cpp overrides, GGUF, compressed-tensors, download files."""
