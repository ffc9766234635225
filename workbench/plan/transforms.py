"""Transform specs of a plan (version 2): what to do to a model before its layers are quantized.

A plan's `transforms` is an ordered list; each entry is applied, in order, to a copy of the model
(`workbench.transform.rotate.apply_transforms`) and leaves the fp32 model's logits unchanged (computational
invariance):

    {"kind": "hadamard", "where": "residual", "seed": 0}
        fuse every RMSNorm scale into the linears that read it, then rotate the residual stream by a
        random-signed Hadamard Q (quant/hadamard.py): embeddings E Q, readers W Q, writers Qᵀ W, head W Q.
    {"kind": "hadamard", "where": "down", "seed": 0}
        an online Hadamard before each down_proj (its input x -> x H at run time, W -> W H), which cannot be
        folded into the previous layer because SiLU(gate) * up sits between them.
    {"kind": "smooth", "match": "role:down", "alpha": 0.5, "calib_seqs": 16, "calib": "wiki"}
        SmoothQuant (https://arxiv.org/abs/2211.10438) on the layers `match` selects (a plan match string):
        per input channel s_j = max|X_j|^α / max|W_j|^(1-α), W[:, j] *= s_j and the previous operation divides
        its output channel j by s_j: the RMSNorm before q/k/v and gate/up, up_proj before down_proj, v_proj
        before o_proj (per key/value head channel), the final norm before lm_head.

This file holds the specs and their JSON (no tensors): `parse_transforms` refuses an unknown kind naming it,
an unknown key, α outside [0, 1] and a bad `where`, all problems at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from workbench.errors import WorkbenchError

HADAMARD_WHERE = ("residual", "down")


@dataclass(frozen=True)
class Hadamard:
    """Random-signed Hadamard rotation of the residual stream or online before down_proj."""

    where: str = "residual"
    seed: int = 0
    kind: str = "hadamard"

    def problems(self) -> list[str]:
        if self.where not in HADAMARD_WHERE:
            return [f"'where' must be one of {', '.join(HADAMARD_WHERE)}, got {self.where!r}"]
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            return [f"'seed' must be an integer, got {self.seed!r}"]
        return []


@dataclass(frozen=True)
class Smooth:
    """SmoothQuant scaling of the inputs of the layers `match` selects, strength `alpha`."""

    match: str
    alpha: float = 0.5
    calib_seqs: int = 16
    calib: str = "wiki"  # calibration text source (workbench.model.data)
    kind: str = "smooth"

    def problems(self) -> list[str]:
        out = []
        if not isinstance(self.match, str):
            out.append(f"'match' must be a plan match string, got {self.match!r}")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not 0 <= self.alpha <= 1
        ):
            out.append(f"alpha must be in [0, 1], got {self.alpha!r}")
        if isinstance(self.calib_seqs, bool) or not isinstance(self.calib_seqs, int) or self.calib_seqs < 1:
            out.append(f"'calib_seqs' must be a positive integer, got {self.calib_seqs!r}")
        if not isinstance(self.calib, str):
            out.append(f"'calib' must be a text source name or path, got {self.calib!r}")
        return out


Transform = Hadamard | Smooth
TRANSFORM_KINDS: dict[str, type] = {"hadamard": Hadamard, "smooth": Smooth}


def transform_to_json(t: Transform) -> dict:
    d = asdict(t)
    return {"kind": d.pop("kind"), **d}


def parse_transforms(items, source: str = "plan") -> list[Transform]:
    """Transform specs from a plan's `transforms` list; one WorkbenchError lists every problem."""
    if not isinstance(items, list):
        raise WorkbenchError(f"{source}: 'transforms' must be a list, got {type(items).__name__}")
    out, problems = [], []
    for i, d in enumerate(items, 1):
        where = f"transform {i}"
        if not isinstance(d, dict) or not isinstance(d.get("kind"), str):
            problems.append(f"{where} must be an object with a 'kind', got {d!r}")
            continue
        cls = TRANSFORM_KINDS.get(d["kind"])
        if cls is None:
            problems.append(
                f"{where}: transform kind '{d['kind']}' cannot be run by this workbench "
                f"(it runs: {', '.join(TRANSFORM_KINDS)})"
            )
            continue
        fields = set(cls.__dataclass_fields__) - {"kind"}
        extra = sorted(set(d) - fields - {"kind"})
        if extra:
            problems.append(f"{where} ({d['kind']}): unknown key(s) {', '.join(map(repr, extra))}")
            continue
        try:
            t = cls(**{k: v for k, v in d.items() if k != "kind"})
        except TypeError as exc:
            problems.append(f"{where} ({d['kind']}): {exc}")
            continue
        problems += [f"{where} ({d['kind']}): {p}" for p in t.problems()]
        out.append(t)
    if problems:
        raise WorkbenchError(f"{source}: " + "; ".join(problems))
    return out
