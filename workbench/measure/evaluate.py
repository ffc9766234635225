"""Quality of a (simulated) quantized model against its unquantized reference: perplexity, KL, top-1.

Definitions (DESIGN.md): the text's documents are joined with "\\n\\n" and tokenized once, cut into
non-overlapping windows of `seq_len` tokens (`data.eval_windows`); in each window every position but the last
predicts the next token, and
    perplexity = exp(mean NLL over every predicted token)
    KL         = mean over those positions of KL(P_ref || P_q), in nats
    top-1      = fraction of those positions where argmax P_q == argmax P_ref.

Reference cache. Full reference log-probs do not fit (SmolLM2: 49152 x 32k tokens x 4 B = 6.4 GB), and fp16
log-probs are not precise enough for small KLs (an error of ~0.01 on log p shifts KL by ~0.01 nats, more
than an int8 layer's whole effect). We cache instead, exactly, the *input of the output head* of the
reference model (the final normed hidden states, [n_windows, seq_len, hidden] in the model dtype: 75 MB for
SmolLM2 at 32k tokens) plus the reference NLL; an evaluation recomputes the reference logits with one
matmul by the reference head weight (held aside even when the plan quantizes the head) - about a fifth
of a forward pass - instead of a second full forward. The first reference pass checks that
head(hidden) reproduces the model's logits (models that post-process logits are refused). Cache key: model
fingerprint + source + the exact token windows (text, tokenizer, seq_len and token limit) + dtype.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.paths import cache_dir
from workbench.progress import Progress, note, prints, progress_bar, stage


@dataclass
class EvalResult:
    """Quality numbers of one evaluation (kl/top1 are 0/1 for the reference itself)."""

    ppl: float
    nll: float
    ref_ppl: float
    kl: float
    top1: float
    n_tokens: int  # predicted tokens (n_windows * (seq_len - 1))
    n_windows: int
    seq_len: int
    text: str
    seconds: float
    quantize_seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Reference:
    """Reference model outputs on the evaluation windows (see module doc)."""

    hidden: torch.Tensor  # [n, L, H] input of the output head
    nll_sum: torch.Tensor  # [n] float64, summed NLL of each window's L-1 predictions


def _head(model: torch.nn.Module) -> torch.nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise WorkbenchError(
            f"{type(model).__name__} has no output head (get_output_embeddings): cannot evaluate"
        )
    return head


def _batch_size(seq_len: int, device: torch.device) -> int:
    return 1 if device.type == "cpu" else max(1, 8192 // seq_len)


def _progress(total: int, desc: str, progress: Progress):
    return progress_bar(total, desc, progress, unit="window")


def token_kl(lp_ref: torch.Tensor, lp_q: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_q) in nats at every position, from log-probabilities [..., V] -> [...]."""
    return F.kl_div(lp_q, lp_ref, reduction="none", log_target=True).sum(-1)


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL per window: logits [b, L, V] predicting ids [b, L] shifted by one -> [b] float64."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -lp.gather(-1, ids[:, 1:, None]).squeeze(-1).double().sum(-1)


@torch.no_grad()
def compute_reference(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int | None = None, progress: Progress = True
) -> Reference:
    """Run the unquantized model over windows [n, L]; keep the head inputs and NLLs."""
    device = next(model.parameters()).device
    head = _head(model)
    bs = batch_size or _batch_size(windows.shape[1], device)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    hidden, nll = [], []
    try:
        with _progress(windows.shape[0], "reference", progress) as bar:
            for s0 in range(0, windows.shape[0], bs):
                ids = windows[s0 : s0 + bs].to(device)
                captured.clear()
                logits = model(input_ids=ids, use_cache=False).logits
                assert len(captured) == 1, "the output head ran more than once in a forward"
                h = captured[0]
                if s0 == 0:
                    again = F.linear(h, head.weight, getattr(head, "bias", None))
                    err = float((again.float() - logits.float()).abs().max())
                    if err > 1e-3 * max(1.0, float(logits.float().abs().max())):
                        raise WorkbenchError(
                            f"{type(model).__name__} post-processes its logits (head(hidden) "
                            f"differs by {err:.3g}): the reference cache cannot rebuild them"
                        )
                hidden.append(h.cpu())
                nll.append(_nll_sum(logits, ids).cpu())
                bar.update(ids.shape[0])
    finally:
        handle.remove()
    return Reference(hidden=torch.cat(hidden), nll_sum=torch.cat(nll))


def reference_for(
    loaded, windows: torch.Tensor, progress: Progress = True, use_cache: bool = True
) -> Reference:
    """`compute_reference` cached on disk (key: fingerprint, source, exact windows, dtype)."""
    from safetensors.torch import load_file, save_file

    d = loaded.description
    dtype = str(next(loaded.model.parameters()).dtype)
    # the window shape is part of the key: 8 x 512 and 2 x 2048 windows of the same text have the same bytes
    h = hashlib.sha1(f"{d.fingerprint}|{d.source}|{dtype}|v1|{tuple(windows.shape)}|".encode())
    h.update(windows.numpy().tobytes())
    path = cache_dir("reference") / f"{h.hexdigest()[:20]}.safetensors"
    if use_cache and path.is_file():
        t = load_file(str(path))
        return Reference(hidden=t["hidden"], nll_sum=t["nll_sum"])
    ref = compute_reference(loaded.model, windows, progress=progress)
    if use_cache:
        tmp = path.with_name(path.name + ".tmp")
        save_file({"hidden": ref.hidden.contiguous(), "nll_sum": ref.nll_sum.contiguous()}, str(tmp))
        tmp.replace(path)
    return ref


@torch.no_grad()
def compare_to_reference(
    model: torch.nn.Module,
    windows: torch.Tensor,
    ref: Reference,
    ref_head_weight: torch.Tensor,
    ref_head_bias: torch.Tensor | None = None,
    batch_size: int | None = None,
    progress: Progress = True,
    desc: str = "evaluate",
) -> tuple[float, float, float, int]:
    """(summed NLL, summed KL, top-1 matches, predicted tokens) of the model as it is now vs `ref`."""
    device = next(model.parameters()).device
    bs = batch_size or _batch_size(windows.shape[1], device)
    nll = kl = top1 = 0.0
    count = 0
    with _progress(windows.shape[0], desc, progress) as bar:
        for s0 in range(0, windows.shape[0], bs):
            ids = windows[s0 : s0 + bs].to(device)
            lp_q = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
            h = ref.hidden[s0 : s0 + bs, :-1].to(device, ref_head_weight.dtype)
            lp_r = torch.log_softmax(F.linear(h, ref_head_weight, ref_head_bias).float(), dim=-1)
            nll += float(-lp_q.gather(-1, ids[:, 1:, None]).double().sum())
            kl += float(token_kl(lp_r, lp_q).double().sum())
            top1 += float((lp_r.argmax(-1) == lp_q.argmax(-1)).sum())
            count += lp_q.shape[0] * lp_q.shape[1]
            bar.update(ids.shape[0])
    return nll, kl, top1, count


def evaluate(
    loaded,
    resolved=None,
    text: str = "wikitext2",
    seq_len: int | None = None,
    max_tokens: int | None = 32768,
    grams: dict[str, torch.Tensor] | None = None,
    progress: Progress = True,
    use_cache: bool = True,
    transformed=None,
) -> EvalResult:
    """Perplexity, KL and top-1 of `loaded` with `resolved` layers fake-quantized (None: the reference).

    Args:
        resolved: a ResolvedPlan (`plan.resolve(model)`; a Plan or {layer: spec} is resolved once here by
            `ResolvedPlan.of`); None evaluates the unquantized model.
        text: evaluation text source (`data.eval_windows`); max_tokens: token limit.
        seq_len: window length (None: min(512, the model's context)).
        grams: Gram matrices of `resolved.gram_layers` (`simulate.calibration_grams`), of the transformed
            model when the plan has transforms.
        transformed: `transformed.apply_transforms(loaded, resolved.transforms)` when the caller already
            made it (None: made here when the plan has transforms). The reference is always `loaded.model`;
            the plan's weights are quantized, and its activation and KV-cache specs simulated (kvsim.py), on
            the transformed copy. A ResolvedPlan with no layers but a `kv` measures the cache alone.
        progress: True (tqdm), False, or a callback fn(fraction, text) (`workbench.progress`): the
            reference fills [0, 0.35] (instant when cached), quantization [0.35, 0.55], the comparison
            [0.55, 1]; a callback that raises stops the evaluation with the model restored.
    """
    from workbench.measure.kvsim import kv_quantized
    from workbench.measure.simulate import act_quantized, fake_quantized
    from workbench.model.data import default_seq_len, eval_windows
    from workbench.plan.kv import check_context
    from workbench.plan.plan import ResolvedPlan

    resolved = None if resolved is None else ResolvedPlan.of(loaded.model, resolved)

    t0 = time.perf_counter()
    seq_len = seq_len or default_seq_len(loaded.description.max_context)
    note(progress, 0.0, f"tokenizing '{text}'")
    windows = eval_windows(
        loaded.tokenizer, text, seq_len, max_tokens, max_context=loaded.description.max_context
    )
    if resolved is not None:
        check_context(resolved.kv, seq_len)
    ref = reference_for(loaded, windows, progress=stage(progress, 0.0, 0.35), use_cache=use_cache)
    n_pred = windows.shape[0] * (seq_len - 1)
    ref_nll = float(ref.nll_sum.sum()) / n_pred
    common = dict(
        ref_ppl=math.exp(ref_nll), n_tokens=n_pred, n_windows=windows.shape[0], seq_len=seq_len, text=text
    )
    if resolved is None or not (resolved or resolved.kv):
        return EvalResult(
            ppl=math.exp(ref_nll), nll=ref_nll, kl=0.0, top1=1.0, seconds=time.perf_counter() - t0, **common
        )
    head = _head(loaded.model)
    w_ref, b_ref = head.weight, getattr(head, "bias", None)  # kept aside: the plan may swap the head
    model = loaded.model
    if resolved.transforms:
        if transformed is None:
            from workbench.transform.apply import apply_transforms

            transformed = apply_transforms(loaded, resolved.transforms, progress=prints(progress))
        model = transformed.model
    with (
        fake_quantized(model, resolved, grams, progress=stage(progress, 0.35, 0.55)) as qtimes,
        act_quantized(model, resolved.acts),
        kv_quantized(model, resolved.kv),
    ):
        tq = sum(qtimes.values())
        nll, kl, top1, count = compare_to_reference(
            model, windows, ref, w_ref, b_ref, progress=stage(progress, 0.55, 1.0)
        )
    assert count == n_pred, "evaluated a different number of tokens than the reference"
    return EvalResult(
        ppl=math.exp(nll / count),
        nll=nll / count,
        kl=kl / count,
        top1=top1 / count,
        seconds=time.perf_counter() - t0,
        quantize_seconds=tq,
        **common,
    )
