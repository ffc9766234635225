"""KV-cache statistics: per layer and head, the distributions of keys (pre- and post-RoPE) and values.

`kv_statistics(loaded, text, n_seqs, seq_len, seed)` runs the model over calibration windows with hooks on
each attention block (Llama family: the k_proj / v_proj outputs are the pre-RoPE keys and the values; the
post-RoPE keys are rebuilt from the block's rotary embedding) and keeps, per block and side
(`k_pre`, `k_post`, `v`):

    absmax   [H_kv, D]  per head, per channel max |x| over every token
    rms      [H_kv, D]  per head, per channel root mean square
    hist     [N_BINS]   counts of x / absmax(layer side) in N_BINS equal bins over [-1, 1] (a strided
                        sample of at most 65,536 values per window)

Outlier channels (`outliers`): a channel's absmax over the median channel absmax of its head; KIVI and
KVQuant (https://arxiv.org/abs/2402.02750, https://arxiv.org/abs/2401.18079) find keys with a few large
channels and values without. Results are cached on disk (key: model fingerprint, text, windows, seed) and
saved beside the inspection (`kv_stats.safetensors` + `kv_stats.json`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.measure.kvsim import apply_rope
from workbench.paths import cache_dir
from workbench.progress import Progress, track

SIDES = ("k_pre", "k_post", "v")
N_BINS = 64


@dataclass
class KVStats:
    """Per block ({attention module: {side: {absmax, rms, hist, scale}}}) and the settings used."""

    blocks: dict[str, dict[str, dict[str, torch.Tensor]]]
    settings: dict

    def outliers(self, side: str = "k_post", top: int = 5) -> list[dict]:
        """Blocks ranked by their largest channel absmax / median channel absmax (over heads)."""
        rows = []
        for name, sides in self.blocks.items():
            a = sides[side]["absmax"]  # [H, D]
            ratio = a / a.median(-1, keepdim=True).values.clamp_min(1e-12)
            h, d = divmod(int(ratio.argmax()), a.shape[1])
            rows.append(
                {
                    "block": name,
                    "ratio": float(ratio.max()),
                    "head": h,
                    "channel": d,
                    "absmax": float(a[h, d]),
                }
            )
        return sorted(rows, key=lambda r: -r["ratio"])[:top]

    def channel_ratio(self, block: str, side: str, head: int) -> torch.Tensor:
        """[D] each channel's absmax over the head's median channel absmax (> 4: an outlier channel)."""
        a = self.blocks[block][side]["absmax"][head]
        return a / a.median().clamp_min(1e-12)

    def summary(self, top: int = 5) -> str:
        lines = []
        for side in SIDES:
            rows = self.outliers(side, top)
            parts = ", ".join(f"{r['block']} h{r['head']} ch{r['channel']} x{r['ratio']:.1f}" for r in rows)
            lines.append(f"largest {side} outlier channels (absmax / median channel): {parts}")
        return "\n".join(lines)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        flat = {
            f"{b}|{s}|{k}": t.contiguous()
            for b, sd in self.blocks.items()
            for s, d in sd.items()
            for k, t in d.items()
        }
        save_file(flat, str(folder / "kv_stats.safetensors"))
        meta = {"settings": self.settings, **{s: self.outliers(s, 10) for s in SIDES}}
        (folder / "kv_stats.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> KVStats | None:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "kv_stats.safetensors").is_file():
            return None
        blocks: dict = {}
        for key, t in load_file(str(folder / "kv_stats.safetensors")).items():
            b, s, k = key.split("|")
            blocks.setdefault(b, {}).setdefault(s, {})[k] = t
        settings = json.loads((folder / "kv_stats.json").read_text())["settings"]
        return cls(blocks, settings)


def _collect(model: torch.nn.Module, windows: torch.Tensor, progress: Progress = False) -> dict:
    attns = {n: m for n, m in model.named_modules() if n.endswith("self_attn") and hasattr(m, "k_proj")}
    if not attns:
        raise WorkbenchError(
            f"{type(model).__name__}: no Llama-style attention (self_attn.k_proj) to inspect"
        )
    acc: dict = {}
    state: dict = {}
    handles = []

    def add(name, side, x):  # x [B, H, T, D]
        a = acc.setdefault(name, {}).setdefault(side, {"absmax": 0, "sq": 0, "n": 0, "vals": []})
        a["absmax"] = torch.maximum(torch.as_tensor(a["absmax"], device=x.device), x.abs().amax((0, 2)))
        a["sq"] = a["sq"] + x.pow(2).sum((0, 2))
        a["n"] += x.shape[0] * x.shape[2]
        a["vals"].append(x.flatten()[:: max(1, x.numel() // 65536)])

    for name, attn in attns.items():
        D = attn.head_dim

        def pre(mod, args, kwargs, name=name):
            state[name] = kwargs.get("position_embeddings")

        def on_k(mod, args, out, name=name, D=D):
            k = out.float().view(out.shape[0], out.shape[1], -1, D).transpose(1, 2)
            add(name, "k_pre", k)
            cos, sin = state[name]
            add(name, "k_post", apply_rope(k, cos.float(), sin.float()))

        def on_v(mod, args, out, name=name, D=D):
            add(name, "v", out.float().view(out.shape[0], out.shape[1], -1, D).transpose(1, 2))

        handles += [
            attn.register_forward_pre_hook(pre, with_kwargs=True),
            attn.k_proj.register_forward_hook(on_k),
            attn.v_proj.register_forward_hook(on_v),
        ]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            for i in track(range(windows.shape[0]), "K/V statistics", progress, unit="window"):
                model(input_ids=windows[i : i + 1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return acc


def kv_statistics(
    loaded, text: str = "wiki", n_seqs: int = 8, seq_len: int = 512, seed: int = 0, progress: Progress = False
) -> KVStats:
    """K (pre / post RoPE) and V statistics of every attention block (module docstring), cached on disk;
    `progress` (workbench.progress) follows the calibration windows."""
    from safetensors.torch import load_file, save_file

    from workbench.model.data import calibration_batches

    windows = calibration_batches(
        loaded.tokenizer, text, n_seqs, seq_len, seed, max_context=loaded.description.max_context
    )
    settings = {"text": text, "n_seqs": n_seqs, "seq_len": seq_len, "seed": seed}
    key = hashlib.sha1(f"{loaded.description.fingerprint}|{json.dumps(settings)}|v1".encode()).hexdigest()[
        :20
    ]
    path = cache_dir("kvstats") / f"{key}.safetensors"
    if path.is_file():
        blocks: dict = {}
        for k, t in load_file(str(path)).items():
            b, s, f = k.split("|")
            blocks.setdefault(b, {}).setdefault(s, {})[f] = t
        return KVStats(blocks, settings)
    acc = _collect(loaded.model, windows, progress)
    blocks = {}
    for name, sides in acc.items():
        blocks[name] = {}
        for side, a in sides.items():
            vals = torch.cat(a["vals"])
            scale = vals.abs().max().clamp_min(1e-12)
            hist = torch.histc(vals / scale, bins=N_BINS, min=-1.0, max=1.0)
            blocks[name][side] = {  # on the CPU whatever device the model ran on
                "absmax": a["absmax"].cpu(),
                "rms": (a["sq"] / a["n"]).sqrt().cpu(),
                "hist": hist.cpu(),
                "scale": scale.reshape(1).cpu(),
            }
    flat = {
        f"{b}|{s}|{k}": t.contiguous()
        for b, sd in blocks.items()
        for s, d in sd.items()
        for k, t in d.items()
    }
    save_file(flat, str(path))
    return KVStats(blocks, settings)
