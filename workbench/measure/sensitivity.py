"""Sensitivity tables: for every quantizable layer x candidate spec, the cost of quantizing that layer alone.

Methods (`fisher` is the default of the app and the CLI: its costs are nats of KL, so their sum over layers
estimates a whole plan's KL, which is what the allocator minimises; see benchmarks/RESULTS.md):
- `fisher`: the proxy below weighted by the output Fisher (`importance="fisher"`), one name for it.
- `proxy` (no forward passes): the layer-local relative output error of the fake-quantized weight on the
  calibration inputs, from the layer's Gram matrix G = X^T X (`quant.metrics.output_error`):
      e(layer, spec) = tr(D G D^T) / tr(W G W^T),  D = W - fake_quant(W, spec, G).
  Optionally weighted by a per-layer importance measured once (`importance="kl"`): the measured ΔKL of the
  layer at one reference spec divided by its proxy error at that spec, so that cost = e * ΔKL_ref / e_ref
  (exact at the reference spec, proxy-shaped elsewhere). Or by the output Fisher (`importance="fisher"`, one
  forward + backward pass for all layers): with g_t = d log p(y_t)/d out (labels y sampled from the model
  itself, so E[g g^T] is the Fisher of its predictive distribution) and F_i = sum_t g_ti^2 per output
  channel, the second-order estimate of the KL per token is
      ΔKL ~ 1/(2 n) * sum_i F_i * (d_i G d_i^T) / T       (n predicted tokens, T calibration tokens in G),
  a diagonal-Fisher output-error estimate in nats, like the measured `kl` (see e.g. Kim et al. 2023,
  "SqueezeLLM", https://arxiv.org/abs/2306.07629, and HAWQ-V2, https://arxiv.org/abs/1911.03852).
- `kl` (measured): mean KL(P_ref || P_q) in nats over the scan tokens of the whole model with only that layer
  quantized. The hidden states entering every decoder block are computed once on the unquantized model and
  cached (`BlockRunner`); a layer in block b is then scored by re-running blocks b..L-1, the final norm and
  the head from that cached input.

Tables are saved atomically after every layer, so an interrupted scan resumes where it stopped (same model
fingerprint, method, specs and scan settings; otherwise the old file is refused with a message).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.measure.replay import BlockRunner
from workbench.model.inventory import LayerInfo
from workbench.paths import atomic_write_bytes
from workbench.quant.spec import QuantSpec

TABLE_FORMAT = "workbench.sensitivity"
TABLE_VERSION = 1
METHODS = ("fisher", "proxy", "kl")


@dataclass
class SensitivityTable:
    """cost[layer][spec] for the layers of one model (missing entries: not scanned yet)."""

    method: str
    specs: list[str]
    layers: list[LayerInfo]
    cost: dict[str, dict[str, float]] = field(default_factory=dict)
    model: dict = field(default_factory=dict)  # fingerprint, source, name
    settings: dict = field(default_factory=dict)  # text, n_seqs, seq_len, importance, ...
    timing: dict = field(default_factory=dict)  # seconds: setup, scan (accumulated over resumes)
    calibration: dict = field(default_factory=dict)  # spec -> measured / predicted / scale (calibrate.py)

    @property
    def complete(self) -> bool:
        return all(s in self.cost.get(x.name, {}) for x in self.layers for s in self.specs)

    def done_layers(self) -> set[str]:
        return {x.name for x in self.layers if all(s in self.cost.get(x.name, {}) for s in self.specs)}

    def bits(self, layer: LayerInfo, spec: str) -> int:
        return QuantSpec.parse(spec).storage_bits(layer.out_features, layer.in_features)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict:
        return {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "method": self.method,
            "specs": self.specs,
            "model": self.model,
            "settings": self.settings,
            "timing": self.timing,
            "calibration": self.calibration,
            "layers": [x.to_dict() for x in self.layers],
            "cost": {x.name: self.cost[x.name] for x in self.layers if x.name in self.cost},
        }

    @classmethod
    def from_json(cls, d: dict, source: str = "sensitivity table") -> SensitivityTable:
        if not isinstance(d, dict) or d.get("format") != TABLE_FORMAT:
            raise WorkbenchError(
                f"{source}: not a workbench sensitivity table (format tag "
                f"{d.get('format') if isinstance(d, dict) else None!r})"
            )
        if d.get("version") != TABLE_VERSION:
            raise WorkbenchError(
                f"{source}: sensitivity table version {d.get('version')!r} is not supported "
                f"(this workbench reads version {TABLE_VERSION})"
            )
        try:
            layers = [LayerInfo(**x) for x in d["layers"]]
            specs = [str(QuantSpec.parse(s)) for s in d["specs"]]
            cost = {k: {s: float(v) for s, v in row.items()} for k, row in d.get("cost", {}).items()}
            return cls(
                method=d["method"],
                specs=specs,
                layers=layers,
                cost=cost,
                model=d.get("model", {}),
                settings=d.get("settings", {}),
                timing=d.get("timing", {}),
                calibration=d.get("calibration", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkbenchError(
                f"{source}: malformed sensitivity table ({type(exc).__name__}: {exc})"
            ) from None

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), json.dumps(self.to_json(), indent=1).encode())

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        path = Path(path)
        if not path.is_file():
            raise WorkbenchError(f"sensitivity table {path} not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise WorkbenchError(
                f"sensitivity table {path}: invalid JSON at line {exc.lineno} ({exc.msg})"
            ) from None
        return cls.from_json(d, source=f"sensitivity table {path}")

    # ------------------------------------------------------------------ views
    def rows(self) -> list[list]:
        """[layer, cost per spec...] for display (nan when missing)."""
        return [
            [x.name] + [self.cost.get(x.name, {}).get(s, math.nan) for s in self.specs] for x in self.layers
        ]


# ---------------------------------------------------------------------- scans
def resume_scan(path: Path | None, table: SensitivityTable) -> SensitivityTable:
    """The table to continue: the one saved at `path` when it has the same identity, else `table`; a
    different scan there is refused with a message naming the file (the in-memory and streamed scans)."""
    if path is None or not Path(path).is_file():
        return table
    old = SensitivityTable.load(path)
    same = (
        old.method == table.method
        and old.specs == table.specs
        and old.settings == table.settings
        and old.model.get("fingerprint") == table.model.get("fingerprint")
        and [x.name for x in old.layers] == [x.name for x in table.layers]
    )
    if not same:
        raise WorkbenchError(
            f"{path} holds a different scan (method, specs, layers, model or settings differ): "
            "delete it or choose another --out"
        )
    table.cost = old.cost
    table.timing = old.timing
    table.calibration = old.calibration
    return table


def _scan(table: SensitivityTable, out: Path | None, score_layer, progress: bool, on_layer=None) -> None:
    """Score every layer not done yet with score_layer(layer) -> {spec: cost}; save after each layer."""
    from tqdm.auto import tqdm

    todo = [x for x in table.layers if x.name not in table.done_layers()]
    t_start = time.perf_counter()
    base = float(table.timing.get("scan", 0.0))
    for layer in tqdm(
        todo,
        desc=f"sensitivity ({table.method})",
        unit="layer",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    ):
        table.cost[layer.name] = {s: float(v) for s, v in score_layer(layer).items()}
        table.timing["scan"] = base + time.perf_counter() - t_start
        if out is not None:
            table.save(out)
        if on_layer is not None:
            on_layer(layer.name)


def proxy_costs(
    W: torch.Tensor,
    gram: torch.Tensor,
    specs: list[str],
    name: str = "",
    row_weight: torch.Tensor | None = None,
) -> dict[str, float]:
    """Relative output error tr(D G D^T) / tr(W G W^T) of W [N, K] for each spec (D = W - fake_quant);
    with `row_weight` [N]: the weighted sum sum_i row_weight_i * d_i G d_i^T instead (not relative)."""
    from workbench.measure.simulate import needs_gram
    from workbench.quant.api import fake_quant
    from workbench.quant.metrics import quadratic_form

    W = W.detach().float()
    G = gram.float().to(W.device)
    den = float(quadratic_form(W, G).sum())
    out = {}
    for s in specs:
        W_hat = fake_quant(W, s, G if needs_gram(s) else None, layer=name).to(W.device)
        q = quadratic_form(W - W_hat, G)
        if row_weight is not None:
            out[s] = float((q * row_weight.to(q.device, q.dtype)).sum())
            continue
        num = float(q.sum())
        out[s] = num / den if den > 0 else (0.0 if num == 0 else math.inf)
    return out


def output_fisher(
    model: torch.nn.Module, windows: torch.Tensor, names: list[str], seed: int = 0
) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal output Fisher F_i = sum_t (d log p(y_t) / d out_ti)^2 of each layer [out_features] (float64),
    labels y sampled from the model's own distribution; and the number of predicted tokens.

    Windows [n, L] are run one at a time (forward + backward); parameters get no gradients.
    """
    from workbench.model.inventory import get_module

    fisher: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name):
        def hook(module, args, out):
            if out.requires_grad:

                def grad_hook(g):
                    sq = g.detach().double().pow(2).sum(dim=tuple(range(g.dim() - 1)))
                    fisher[name] = fisher[name] + sq if name in fisher else sq

                out.register_hook(grad_hook)

        return hook

    flags = [(p, p.requires_grad) for p in model.parameters()]
    emb = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    n_pred = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        handles.append(emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        handles += [get_module(model, n).register_forward_hook(hook_for(n)) for n in names]
        with torch.enable_grad():
            for i in range(windows.shape[0]):
                logits = (
                    model(input_ids=windows[i : i + 1].to(device), use_cache=False).logits[:, :-1].float()
                )
                probs = torch.softmax(logits.detach(), -1).reshape(-1, logits.shape[-1]).cpu()
                y = torch.multinomial(probs, 1, generator=gen).view(-1).to(device)
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y, reduction="sum"
                ).backward()
                n_pred += y.numel()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return fisher, n_pred


def _identity(loaded, layers, method, specs, settings) -> SensitivityTable:
    d = loaded.description
    return SensitivityTable(
        method=method,
        specs=[str(QuantSpec.parse(s)) for s in specs],
        layers=layers,
        model={"fingerprint": d.fingerprint, "source": d.source, "name": d.name},
        settings=settings,
    )


def sensitivity_scan(
    loaded,
    specs: list[str],
    method: str = "fisher",
    *,
    out: str | Path | None = None,
    text: str = "wiki",
    n_seqs: int = 2,
    seq_len: int | None = None,
    seed: int = 1,
    calib_seqs: int = 32,
    calib_seq_len: int | None = None,
    importance: str = "none",
    importance_spec: str | None = None,
    layers: list[str] | None = None,
    grams: dict[str, torch.Tensor] | None = None,
    calibrate: bool | str | None = None,
    progress: bool = True,
    on_layer=None,
    on_setup=None,
) -> SensitivityTable:
    """Scan every quantizable layer x spec and return the table (saved to `out` after every layer).

    Args:
        specs: candidate specs (quantized ones; bf16 costs 0 by definition and is not scanned).
        method: "fisher" (= "proxy" with importance="fisher"), "proxy" or "kl" (module doc).
        text, n_seqs, seq_len, seed: the kl scan windows (`calibration_batches`), also used for the
            proxy's importance measurement (the Fisher pass); seq_len None is min(256, the model's context).
        calib_seqs, calib_seq_len: calibration for the Gram matrices (proxy, and gptq/awq specs), on `text`;
            calib_seq_len None is min(512, the model's context).
        importance: "none", "kl" or "fisher" (proxy only): weight each layer by one measured ΔKL at
            `importance_spec` (default: the first spec), or by its output Fisher.
        layers: restrict to these layer names (default: all quantizable linears).
        grams: {layer: [K, K] X^T X} of `calib_seqs` x `calib_seq_len` tokens of `text` (seed 0) already
            at hand (e.g. an inspection's statistics); missing layers are collected by `calibration_grams`.
        calibrate: "uniform": scale each spec's costs so that its uniform plan's sum equals the KL
            measured on the scan windows; "check" (or True): then also measure the allocator's plans at
            every uniform size and standard budget (the guard's pool); "roles": before the check, also
            measure each role alone and scale its layers' costs (`calibrate.py`); False: none. Default:
            "check" for "fisher", False otherwise.
        on_layer: callback(layer name) after each saved layer (progress hooks, tests).
        on_setup: callback(str) before each setup step (Grams, Fisher pass), for progress messages.
    """
    from workbench.measure.simulate import calibration_grams, needs_gram, quantized_weight
    from workbench.model.data import calibration_batches, default_seq_len
    from workbench.model.inventory import layer_inventory

    if method not in METHODS:
        raise WorkbenchError(f"unknown sensitivity method '{method}' (choose {', '.join(METHODS)})")
    if importance not in ("none", "kl", "fisher"):
        raise WorkbenchError(f"unknown importance '{importance}' (choose none, kl or fisher)")
    if method == "fisher":
        if importance not in ("none", "fisher"):
            raise WorkbenchError(f"method 'fisher' already sets the importance (got '{importance}')")
        importance = "fisher"
    specs = [str(QuantSpec.parse(s)) for s in specs]
    if not specs:
        raise WorkbenchError("no specs to scan")
    inv = layer_inventory(loaded.model)
    if layers is not None:
        known = {x.name for x in inv}
        bad = [n for n in layers if n not in known]
        if bad:
            raise WorkbenchError(f"layer {bad[0]} is not a quantizable linear of this model")
        inv = [x for x in inv if x.name in set(layers)]
    imp_spec = str(QuantSpec.parse(importance_spec or specs[0]))
    seq_len = seq_len or default_seq_len(loaded.description.max_context, 256)
    calib_seq_len = calib_seq_len or default_seq_len(loaded.description.max_context)
    settings = {"text": text, "calib_seqs": calib_seqs, "calib_seq_len": calib_seq_len}
    if method == "kl" or importance in ("kl", "fisher"):
        settings.update(n_seqs=n_seqs, seq_len=seq_len, seed=seed)
    if method in ("proxy", "fisher"):
        settings.update(importance=importance, importance_spec=imp_spec if importance == "kl" else None)
    calibrate = calibration_stage(method, calibrate)
    if calibrate:
        settings.update(calibrate=calibrate, n_seqs=n_seqs, seq_len=seq_len, seed=seed)
    table = resume_scan(Path(out) if out else None, _identity(loaded, inv, method, specs, settings))
    if table.complete and _calibrated(table, calibrate):
        return table

    say = on_setup or (lambda _msg: None)
    t0 = time.perf_counter()
    need_grams = method != "kl" or any(needs_gram(s) for s in specs)
    grams = dict(grams or {})
    missing = [x.name for x in inv if x.name not in grams] if need_grams else []
    if missing:
        say(f"calibration Gram matrices: {calib_seqs} x {calib_seq_len} tokens of '{text}'")
        grams.update(calibration_grams(loaded, missing, text, calib_seqs, calib_seq_len, progress=progress))
    runner, fisher, n_pred, windows = None, {}, 1, None
    if method == "kl" or importance in ("kl", "fisher") or calibrate:
        windows = calibration_batches(
            loaded.tokenizer, text, n_seqs, seq_len, seed, max_context=loaded.description.max_context
        )
    if method == "kl" or importance == "kl":
        runner = BlockRunner(loaded.model)
        runner.capture(windows)
    if importance == "fisher" and not table.complete:
        say(f"output Fisher: forward + backward over {n_seqs} x {seq_len} tokens of '{text}'")
        fisher, n_pred = output_fisher(loaded.model, windows, [x.name for x in inv], seed=seed)
    table.timing["setup"] = float(table.timing.get("setup", 0.0)) + time.perf_counter() - t0

    def score(layer: LayerInfo) -> dict[str, float]:
        if method == "kl":
            block = runner.block_of(layer)
            return {
                s: runner.kl_from(block, {layer.name: quantized_weight(loaded.model, layer.name, s, grams)})
                for s in specs
            }
        from workbench.model.inventory import get_linear_weight, get_module

        W = get_linear_weight(get_module(loaded.model, layer.name))
        if importance == "fisher":
            weight = fisher[layer.name] / (2.0 * n_pred * calib_seqs * calib_seq_len)
            return proxy_costs(W, grams[layer.name], specs, name=layer.name, row_weight=weight)
        costs = proxy_costs(W, grams[layer.name], specs, name=layer.name)
        if importance == "kl":
            ref_err = (
                costs[imp_spec]
                if imp_spec in costs
                else proxy_costs(W, grams[layer.name], [imp_spec])[imp_spec]
            )
            dkl = runner.kl_from(
                runner.block_of(layer),
                {layer.name: quantized_weight(loaded.model, layer.name, imp_spec, grams)},
            )
            w = dkl / ref_err if ref_err > 0 else 0.0
            costs = {s: c * w for s, c in costs.items()}
        return costs

    _scan(table, Path(out) if out else None, score, progress, on_layer)
    if calibrate:
        _calibrate(loaded, table, calibrate, windows, grams, say, Path(out) if out else None)
    return table


def calibration_stage(method: str, calibrate) -> str | None:
    """The calibration stage a scan runs to: None, "uniform", "check" or "roles" (`calibrate.py`)."""
    if calibrate is None:
        return "check" if method == "fisher" else None
    if calibrate is True:
        return "check"
    if calibrate is False:
        return None
    if calibrate not in ("uniform", "check", "roles"):
        raise WorkbenchError(f"unknown calibration '{calibrate}' (choose uniform, check or roles)")
    return calibrate


def _calibrated(table: SensitivityTable, stage: str | None) -> bool:
    c = table.calibration
    return stage is None or ("uniform" in c and (stage == "uniform" or ("plans" in c and "refined" in c)))


def _calibrate(loaded, table, stage: str, windows, grams, say, out: Path | None) -> None:
    """Run the calibration stages `table` lacks (uniform plans, then roles and the check)."""
    from workbench.measure.calibrate import calibrate_table, refine_plans, refine_table

    def roles(i: int, n: int, label: str) -> None:
        say(f"calibrating: {label} measured on the scan windows ({i + 1}/{n})")

    if "uniform" not in table.calibration:
        t0 = time.perf_counter()

        def step(i: int, n: int, spec: str) -> None:
            say(f"calibrating: uniform {spec} measured on the scan windows ({i + 1}/{n})")

        table.calibration = {"uniform": calibrate_table(loaded, table, windows, grams, on_spec=step)}
        table.timing["calibrate"] = time.perf_counter() - t0
        if out is not None:
            table.save(out)
    if stage in ("check", "roles") and "plans" not in table.calibration:
        t0 = time.perf_counter()
        refine_table(loaded, table, windows, grams, roles=stage == "roles", on_step=roles)
        table.timing["refine"] = time.perf_counter() - t0
        if out is not None:
            table.save(out)
    if stage in ("check", "roles") and "refined" not in table.calibration:  # checked before refinement
        t0 = time.perf_counter()
        refine_plans(loaded, table, windows, grams, on_step=roles)
        table.timing["refine_moves"] = time.perf_counter() - t0
        if out is not None:
            table.save(out)
