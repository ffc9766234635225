"""The model: loading every source, llama2.c, tokenizers, the layer inventory, token data."""
