"""Named presets in one place: the specs the app offers and the settings its scans and evaluations use.

The app (`ui/state.py`), the `allocate --verify` command, the plan-quality benchmark and the tests all read
these, so "the default settings" means one thing. Small models (< 5M parameters, e.g. stories260K) get
TinyStories text and shorter windows; larger ones WikiText.
"""

from __future__ import annotations

# Specs offered in the editor (any other spec string can be typed).
CANDIDATE_SPECS = [
    "bf16",
    "int8_ch",
    "fp8_e4m3",
    "int6_g128",
    "int5_g128",
    "int4_g128",
    "int4_g64",
    "int4_g32",
    "nf4_g64",
    "mxfp4",
    "nvfp4",
    "int3_g64",
    "int3_g32",
    "int2_g32",
]
# Specs the sensitivity scan offers by default (the allocator's candidates, bf16 added by the allocator).
SENSITIVITY_SPECS = [
    "int8_ch",
    "int6_g128",
    "int4_g128",
    "int4_g32",
    "nf4_g64",
    "mxfp4",
    "int3_g64",
    "int3_g32",
    "int2_g32",
]
# The default sensitivity method: the Fisher-weighted proxy, whose sum over layers estimates a plan's KL.
DEFAULT_METHOD = "fisher"
SMALL_MODEL_PARAMS = 5_000_000


def _small(description) -> bool:
    return description is not None and description.n_params < SMALL_MODEL_PARAMS


def _fit(seq_len: int, description) -> int:
    """`seq_len`, shortened to the model's context where that is shorter."""
    context = getattr(description, "max_context", None)
    return min(seq_len, context) if context else seq_len


def calibration_settings(description) -> dict:
    """Calibration text and size (Gram matrices, statistics): small enough to stay interactive on a CPU."""
    small = _small(description)
    return {
        "text": "tinystories" if small else "wiki",
        "n_seqs": 16,
        "seq_len": _fit(128 if small else 256, description),
    }


def fisher_settings(description) -> dict:
    """Windows of the Fisher pass (forward + backward, labels sampled from the model): n_seqs x seq_len."""
    return {"n_seqs": 8, "seq_len": _fit(128 if _small(description) else 256, description)}


def scan_settings(description) -> dict:
    """Keyword arguments of `sensitivity_scan` for the default scan of a model (method excluded)."""
    cal, fis = calibration_settings(description), fisher_settings(description)
    return {
        "text": cal["text"],
        "calib_seqs": cal["n_seqs"],
        "calib_seq_len": cal["seq_len"],
        "n_seqs": fis["n_seqs"],
        "seq_len": fis["seq_len"],
    }


def eval_settings(description) -> dict:
    """Quick evaluation text and size (the Measure tab, `allocate --verify`)."""
    small = _small(description)
    return {
        "text": "tinystories" if small else "wikitext2",
        "seq_len": _fit(256 if small else 512, description),
        "max_tokens": 4096,
    }


def default_scan(loaded, specs=None, *, out=None, method: str = DEFAULT_METHOD, **kwargs):
    """`sensitivity_scan` of `loaded` with the default specs, method and settings (kwargs override)."""
    from workbench.measure.sensitivity import sensitivity_scan

    settings = {**scan_settings(loaded.description), **kwargs}
    return sensitivity_scan(loaded, list(specs or SENSITIVITY_SPECS), method, out=out, **settings)
