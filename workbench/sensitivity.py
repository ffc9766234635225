"""Sensitivity tables: for every quantizable layer x candidate spec, the cost of quantizing that layer alone.

Methods:
- `proxy` (no forward passes): the layer-local relative output error of the fake-quantized weight on the
  calibration inputs, from the layer's Gram matrix G = X^T X (`quant.metrics.output_error`):
      e(layer, spec) = tr(D G D^T) / tr(W G W^T),  D = W - fake_quant(W, spec, G).
  Optionally weighted by a per-layer importance measured once (`importance="kl"`): the measured ΔKL of the
  layer at one reference spec divided by its proxy error at that spec, so that cost = e * ΔKL_ref / e_ref
  (exact at the reference spec, proxy-shaped elsewhere).
- `kl` (measured): mean KL(P_ref || P_q) in nats over the scan tokens of the whole model with only that layer
  quantized. The hidden states entering every decoder block are computed once on the unquantized model and
  cached (block_runner.py); a layer in block b is then scored by re-running blocks b..L-1, the final norm and
  the head from that cached input, for all candidate specs of the layer in one batch.

Tables are saved atomically after every layer, so an interrupted scan resumes where it stopped (same model
fingerprint, method, specs and scan settings; otherwise the old file is refused with a message).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.inventory import LayerInfo
from workbench.paths import atomic_write_bytes
from workbench.quant.spec import QuantSpec

TABLE_FORMAT = "workbench.sensitivity"
TABLE_VERSION = 1
METHODS = ("proxy", "kl")


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
