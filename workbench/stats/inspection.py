"""A whole-model inspection: weight and activation statistics of every quantizable layer, cached on disk.

`inspect_model(loaded, text, n_seqs, seq_len, seed)` returns an `Inspection` holding, per layer, its
`WeightStats` (with the grid levels of a few specs) and its `ActivationStats` over the calibration tokens.
The result is cached (see cache.py): the second call with the same model, text and settings loads it from
disk. `Inspection.outliers()` / `massive()` / `heavy_tails()` rank the layers for the summary, the app and
the `workbench inspect` command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.progress import Progress, stage, track
from workbench.stats.accumulator import ActivationStats, TokenMax
from workbench.stats.cache import ARRAYS, SCALARS, cache_folder, cache_key, read_folder, write_folder
from workbench.stats.weights import GridLevels, WeightStats

DEFAULT_SPECS = ("int4_g128", "int8_ch")  # more with specs=...; grid_levels() computes any on demand
_W, _A = "w", "a"
_TM = ("values", "channels", "seqs", "positions", "token_ids", "log2_edges", "log2_counts")
_WT = ("absmax_out", "absmax_in", "hist_edges", "hist_counts", "log_edges", "log_counts")


@dataclass
class Inspection:
    """Statistics of every quantizable layer of one model over one calibration set.

    `model` is the ModelDescription dict, `layers` the inventory (LayerInfo dicts), `settings` what the
    statistics depend on, `token_text` the decoded text of every token id named in the massive-activation
    lists, `folder` where it lives on disk.
    """

    model: dict
    layers: list[dict]
    settings: dict
    weights: dict[str, WeightStats]
    activations: dict[str, ActivationStats]
    token_text: dict[int, str] = field(default_factory=dict)
    from_cache: bool = False
    folder: Path | None = None

    # ------------------------------------------------------------------ rankings
    def groups(self) -> list[list[str]]:
        """Layers grouped by shared input (q/k/v, gate/up), in inventory order; leader first."""
        out: dict[str, list[str]] = {}
        for layer in self.layers:
            st = self.activations.get(layer["name"])
            if st is not None:
                out.setdefault(st.shared_with or st.name, []).append(st.name)
        return list(out.values())

    def outliers(self, top_layers: int = 10, top_channels: int = 5) -> list[dict]:
        """Input groups ranked by their largest channel absmax / median channel absmax."""
        rows = []
        for names in self.groups():
            st = self.activations[names[0]]
            chans = st.outlier_channels(top_channels)
            rows.append(
                {
                    "layers": names,
                    "label": group_label(names),
                    "in_features": st.in_features,
                    "max_ratio": chans[0][2],
                    "median_absmax": float(st.absmax.median()),
                    "channels": [{"channel": c, "absmax": a, "ratio": r} for c, a, r in chans],
                }
            )
        rows.sort(key=lambda r: -r["max_ratio"])
        return rows[:top_layers]

    def massive(self, top_layers: int = 5) -> list[dict]:
        """Input groups ranked by their largest per-token max |x| relative to the median token."""
        rows = []
        for names in self.groups():
            tm = self.activations[names[0]].token_max
            if tm.values.numel() == 0:
                continue
            med = tm.median()
            tid = int(tm.token_ids[0])
            rows.append(
                {
                    "label": group_label(names),
                    "layers": names,
                    "max": float(tm.values[0]),
                    "median_token_max": med,
                    "ratio": float(tm.values[0]) / med if med > 0 else float("inf"),
                    "channel": int(tm.channels[0]),
                    "seq": int(tm.seqs[0]),
                    "position": int(tm.positions[0]),
                    "token_id": tid,
                    "token": self.token_text.get(tid, ""),
                }
            )
        rows.sort(key=lambda r: -r["ratio"])
        return rows[:top_layers]

    def heavy_tails(self, top_layers: int = 5) -> list[dict]:
        """Layers ranked by weight excess kurtosis."""
        rows = [
            {
                "layer": n,
                "kurtosis": w.kurtosis,
                "frac_beyond_k_sigma": w.frac_beyond_k_sigma,
                "k_sigma": w.k_sigma,
                "absmax": max(abs(w.min), abs(w.max)),
                "std": w.std,
            }
            for n, w in self.weights.items()
        ]
        rows.sort(key=lambda r: -r["kurtosis"])
        return rows[:top_layers]

    def summary(self, top_layers: int = 10, top_channels: int = 5) -> str:
        """The readable report printed by `workbench inspect`."""
        from workbench.tables import table

        s = self.settings
        lines = [
            f"{self.model.get('name')}: {len(self.layers)} layers, {s['n_seqs']} x {s['seq_len']} tokens "
            f"of '{s['text']}' (seed {s['seed']})" + ("  [from cache]" if self.from_cache else ""),
            "",
            f"Input-channel outliers: channel absmax / median channel absmax (top {top_layers})",
        ]
        rows = [
            [
                r["label"],
                r["in_features"],
                f"{r['max_ratio']:.1f}",
                f"{r['median_absmax']:.3g}",
                ", ".join(f"{c['channel']}: {c['absmax']:.3g} (x{c['ratio']:.0f})" for c in r["channels"]),
            ]
            for r in self.outliers(top_layers, top_channels)
        ]
        lines.append(table(rows, ["layer input", "K", "max ratio", "median", "worst channels (ch: absmax)"]))
        lines += ["", "Massive activations: largest per-token max |x| vs the median token"]
        rows = [
            [
                r["label"],
                f"{r['max']:.4g}",
                f"x{r['ratio']:.0f}",
                r["channel"],
                f"{r['token']!r} (id {r['token_id']}) seq {r['seq']} pos {r['position']}",
            ]
            for r in self.massive()
        ]
        lines.append(table(rows, ["layer input", "max |x|", "vs median", "channel", "token"]))
        k = self.heavy_tails(1)[0]["k_sigma"] if self.weights else 6
        lines += ["", f"Heavy-tailed weights: excess kurtosis, fraction beyond {k:g} sigma"]
        rows = [
            [
                r["layer"],
                f"{r['kurtosis']:.1f}",
                f"{r['frac_beyond_k_sigma']:.2e}",
                f"{r['absmax']:.3g}",
                f"{r['std']:.3g}",
            ]
            for r in self.heavy_tails()
        ]
        lines.append(table(rows, ["layer", "kurtosis", "beyond", "absmax", "std"]))
        return "\n".join(lines)

    # ------------------------------------------------------------------ storage
    def to_parts(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, scalars) for cache.write_folder; shared activation statistics are stored once."""
        tensors: dict[str, torch.Tensor] = {}
        acts = {}
        for name, st in self.activations.items():
            acts[name] = {"n_tokens": st.n_tokens, "shared_with": st.shared_with}
            if st.shared_with is None:
                for f in ("absmax", "mean", "rms", "gram", "hist_edges", "hist_counts"):
                    if getattr(st, f) is not None:
                        tensors[f"{_A}|{name}|{f}"] = getattr(st, f)
                for f in _TM:
                    tensors[f"{_A}|{name}|tm.{f}"] = getattr(st.token_max, f)
        weights = {}
        for name, w in self.weights.items():
            weights[name] = {**w.scalars(), "grids": {}}
            for f in _WT:
                tensors[f"{_W}|{name}|{f}"] = getattr(w, f)
            for spec, g in w.grids.items():
                tensors[f"{_W}|{name}|grid.{spec}"] = g.levels
                weights[name]["grids"][spec] = {
                    "row": g.row,
                    "group": g.group,
                    "scale": g.scale,
                    "which": g.which,
                }
        scalars = {
            "model": self.model,
            "layers": self.layers,
            "settings": self.settings,
            "weights": weights,
            "activations": acts,
            "token_text": {str(k): v for k, v in self.token_text.items()},
        }
        return tensors, scalars

    @classmethod
    def from_parts(
        cls,
        tensors: dict[str, torch.Tensor],
        scalars: dict,
        folder: Path | None = None,
        from_cache: bool = True,
    ) -> Inspection:
        def t(kind, name, f):
            return tensors.get(f"{kind}|{name}|{f}")

        acts: dict[str, ActivationStats] = {}
        for name, a in scalars["activations"].items():
            if a["shared_with"] is None:
                acts[name] = ActivationStats(
                    name=name,
                    n_tokens=a["n_tokens"],
                    absmax=t(_A, name, "absmax"),
                    mean=t(_A, name, "mean"),
                    rms=t(_A, name, "rms"),
                    gram=t(_A, name, "gram"),
                    hist_edges=t(_A, name, "hist_edges"),
                    hist_counts=t(_A, name, "hist_counts"),
                    token_max=TokenMax(**{f: t(_A, name, f"tm.{f}") for f in _TM}),
                )
        for name, a in scalars["activations"].items():
            if a["shared_with"] is not None:
                lead = acts[a["shared_with"]]
                acts[name] = ActivationStats(
                    **{**lead.__dict__, "name": name, "shared_with": a["shared_with"]}
                )
        weights: dict[str, WeightStats] = {}
        for name, w in scalars["weights"].items():
            grids = {
                spec: GridLevels(spec=spec, levels=t(_W, name, f"grid.{spec}"), **g)
                for spec, g in w.pop("grids").items()
            }
            w = {**w, "shape": tuple(w["shape"])}
            weights[name] = WeightStats(**w, **{f: t(_W, name, f) for f in _WT}, grids=grids)
        order = [x["name"] for x in scalars["layers"]]
        return cls(
            model=scalars["model"],
            layers=scalars["layers"],
            settings=scalars["settings"],
            weights={n: weights[n] for n in order if n in weights},
            activations={n: acts[n] for n in order if n in acts},
            token_text={int(k): v for k, v in scalars.get("token_text", {}).items()},
            from_cache=from_cache,
            folder=folder,
        )

    def save(self, folder: str | Path) -> Path:
        """Write arrays.safetensors + stats.json (atomically) and summary.txt into `folder`.

        When this inspection already lives in a cache folder on the same file system, its files are
        hard-linked instead of written again (a cache rewrite replaces the files, never edits them).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder is not None and _link_folder(self.folder, folder)):
            tensors, scalars = self.to_parts()
            write_folder(folder, tensors, scalars)
        (folder / "summary.txt").write_text(self.summary() + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Inspection | None:
        """An inspection saved in `folder`, or None when it is missing or incomplete."""
        parts = read_folder(Path(folder))
        return None if parts is None else cls.from_parts(*parts, folder=Path(folder))


def _link_folder(src: Path, dst: Path) -> bool:
    """Hard-link src's arrays, then scalars, into dst (temp name + os.replace); False if impossible."""
    if src.resolve() == dst.resolve():
        return read_folder(src) is not None
    try:
        for name in (ARRAYS, SCALARS):  # the JSON (the commit record) last
            tmp = dst / f".{name}.{os.getpid()}.link"
            tmp.unlink(missing_ok=True)
            os.link(src / name, tmp)
            os.replace(tmp, dst / name)
    except OSError:
        return False
    return True


def group_label(names: list[str]) -> str:
    """'model.layers.3.self_attn.{q,k,v}_proj' for a shared group, the name itself for one layer."""
    if len(names) == 1:
        return names[0]
    prefix = names[0].rsplit(".", 1)[0]
    leaves = [n.rsplit(".", 1)[-1] for n in names]
    if all(n.startswith(prefix + ".") for n in names) and all(leaf.endswith("_proj") for leaf in leaves):
        return f"{prefix}.{{{','.join(leaf[:-5] for leaf in leaves)}}}_proj"
    return " | ".join(names)


def inspect_model(
    loaded,
    text: str = "wiki",
    n_seqs: int = 64,
    seq_len: int | None = None,
    seed: int = 0,
    *,
    mode: str = "full",
    gram: bool = True,
    specs: tuple[str, ...] | list[str] = DEFAULT_SPECS,
    k_sigma: float = 6.0,
    group_size: int = 128,
    hist_bins: int = 256,
    cache: bool = True,
    progress: Progress = True,
    device: str | None = None,
) -> Inspection:
    """Weight and activation statistics of every quantizable layer of `loaded` (a LoadedModel).

    Args:
        text: calibration text source (see workbench.model.data); n_seqs x seq_len tokens drawn with `seed`
            (seq_len None: min(512, the model's context)).
        mode: "full" or "layerwise" (same statistics; layerwise keeps one block on `device` at a time).
        gram: collect the Gram matrix X^T X of every input.
        specs: quantization specs whose grid levels are stored per layer.
        k_sigma, group_size: weight statistics settings (see weights.py).
        cache: load from / store to the statistics cache.
        progress: True (tqdm), False, or a callback fn(fraction, text) (`workbench.progress`): weight
            statistics fill [0, 0.15], activations [0.15, 1]; a callback that raises stops the collection.
    """
    from workbench.model.data import calibration_batches, default_seq_len
    from workbench.model.inventory import get_linear_weight, get_module, layer_inventory
    from workbench.stats.activations import collect_activation_stats
    from workbench.stats.weights import weight_stats

    desc = loaded.description
    seq_len = seq_len or default_seq_len(desc.max_context)
    specs = [str(s) for s in specs]
    settings = {
        "text": text,
        "n_seqs": n_seqs,
        "seq_len": seq_len,
        "seed": seed,
        "gram": gram,
        "specs": specs,
        "k_sigma": k_sigma,
        "group_size": group_size,
        "hist_bins": hist_bins,
    }
    key = cache_key(
        desc.fingerprint,
        text,
        n_seqs,
        seq_len,
        seed,
        {k: v for k, v in settings.items() if k not in ("text", "n_seqs", "seq_len", "seed")},
    )
    folder = cache_folder(key)
    if cache:
        found = Inspection.load(folder)
        if found is not None:
            return found
    layers = layer_inventory(loaded.model)
    batches = calibration_batches(loaded.tokenizer, text, n_seqs, seq_len, seed, max_context=desc.max_context)
    weights = {}
    for info in track(layers, "weights", stage(progress, 0.0, 0.15), unit="layer"):
        W = get_linear_weight(get_module(loaded.model, info.name))
        weights[info.name] = weight_stats(W, k_sigma, name=info.name, group_size=group_size, specs=specs)
    acts = collect_activation_stats(
        loaded.model,
        batches,
        [x.name for x in layers],
        mode=mode,
        gram=gram,
        progress=stage(progress, 0.15, 1.0),
        device=device,
        hist_bins=hist_bins,
    )
    ids = sorted({int(i) for st in acts.values() for i in st.token_max.token_ids.tolist() if i >= 0})
    token_text = {i: loaded.tokenizer.decode([i]) for i in ids}
    insp = Inspection(
        model=desc.to_dict(),
        layers=[x.to_dict() for x in layers],
        settings=settings,
        weights=weights,
        activations=acts,
        token_text=token_text,
        folder=folder if cache else None,
    )
    if cache:
        tensors, scalars = insp.to_parts()
        write_folder(folder, tensors, scalars)
    return insp
