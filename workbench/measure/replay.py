"""BlockRunner: re-run a model from a cached decoder-block input to the logits.

The engine of the `kl` sensitivity method (sensitivity.py) and of the calibration on measured uniform plans
(calibrate.py): the unquantized model runs once, then each candidate re-runs only the blocks after the
layer it changes.
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError
from workbench.model.inventory import LayerInfo


class BlockRunner:
    """Re-runs the model from a cached decoder-block input to the logits (the `kl` method's engine).

    `capture(windows)` runs the unquantized model once, recording the input hidden states and keyword
    arguments of every decoder block, the head input, and the reference log-probs [n, L-1, V].
    `kl_from(block, weights)` then returns mean KL(P_ref || P_q) with `weights` ({layer: W_hat}) swapped in,
    running only blocks `block`..end, the final norm and the head (block=None: the head only).
    """

    def __init__(self, model: torch.nn.Module):
        from workbench.stats.layerwise import decoder_blocks, final_norm

        self.model = model
        self.blocks_name, self.blocks = decoder_blocks(model)
        self.norm = final_norm(model, self.blocks_name)
        self.head = model.get_output_embeddings()
        self.inputs: list[tuple[torch.Tensor, dict]] = []
        self.head_input: torch.Tensor | None = None
        self.ref_lp: torch.Tensor | None = None

    def block_of(self, layer: LayerInfo) -> int | None:
        prefix = f"{self.blocks_name}."
        if layer.name.startswith(prefix):
            return int(layer.name[len(prefix) :].split(".", 1)[0])
        if self.head is not None and self.model.get_submodule(layer.name) is self.head:
            return None
        raise WorkbenchError(
            f"layer {layer.name} is neither in a decoder block nor the output head: the kl "
            "method cannot re-run from it (use --method proxy)"
        )

    @torch.no_grad()
    def capture(self, windows: torch.Tensor) -> None:
        device = next(self.model.parameters()).device
        inputs: list = [None] * len(self.blocks)
        handles = []

        def hook_for(i):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                inputs[i] = (hidden.detach(), kw)

            return hook

        head_in = []
        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(hook_for(i), with_kwargs=True))
        handles.append(self.head.register_forward_pre_hook(lambda m, a: head_in.append(a[0].detach())))
        try:
            logits = self.model(input_ids=windows.to(device), use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        self.inputs = inputs
        self.head_input = head_in[0]
        self.ref_lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)

    @torch.no_grad()
    def kl_from(self, block: int | None, weights: dict[str, torch.Tensor]) -> float:
        from workbench.measure.evaluate import token_kl
        from workbench.measure.simulate import swapped_weights

        assert self.ref_lp is not None, "capture() first"
        with swapped_weights(self.model, weights):
            if block is None:
                h = self.head_input
            else:
                h = self.inputs[block][0]
                for j in range(block, len(self.blocks)):
                    out = self.blocks[j](h, **self.inputs[j][1])
                    h = out[0] if isinstance(out, (tuple, list)) else out
                h = self.norm(h) if self.norm is not None else h
            lp_q = torch.log_softmax(self.head(h)[:, :-1].float(), dim=-1)
        return float(token_kl(self.ref_lp, lp_q).double().mean())
