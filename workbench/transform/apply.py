"""A plan's transforms (workbench.plan.transforms) applied to a copy of a model: `apply_transforms`.

The copy is a deep copy of `loaded.model`; each transform runs in order (rotate.py: the residual rotation and
the online Hadamard before down_proj; smooth.py: SmoothQuant). The result is a LoadedModel whose description
fingerprint names the transforms, so calibration (Gram) and reference caches never mix the transformed model
with the original. The original model is never touched.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys

from workbench.errors import WorkbenchError
from workbench.plan.transforms import Hadamard, Smooth, Transform, transform_to_json
from workbench.quant.hadamard import random_hadamard
from workbench.transform.rotate import online_hadamard_down, rotate_residual
from workbench.transform.smooth import smooth


def apply_transforms(loaded, transforms: list[Transform] | tuple, progress: bool = False):
    """A LoadedModel with a transformed deep copy of `loaded.model` (module docstring); `loaded` is untouched.

    Args:
        transforms: the plan's transforms, applied in order.
    Returns:
        LoadedModel: same tokenizer, description with fingerprint = hash(original fingerprint, transforms).
    """
    model = copy.deepcopy(loaded.model)
    for t in transforms:
        if isinstance(t, Hadamard) and t.where == "residual":
            rotate_residual(model, random_hadamard(model.model.embed_tokens.weight.shape[1], t.seed))
        elif isinstance(t, Hadamard):
            online_hadamard_down(model, t.seed)
        elif isinstance(t, Smooth):
            smooth(model, loaded, t, progress=progress)
        else:
            raise WorkbenchError(f"transform kind '{getattr(t, 'kind', t)}' cannot be run by this workbench")
    key = json.dumps([transform_to_json(t) for t in transforms], sort_keys=True)
    fp = hashlib.sha1(f"{loaded.description.fingerprint}|{key}".encode()).hexdigest()[:16]
    if progress:
        print(f"transforms applied: {key}", file=sys.stderr)
    model.workbench_transforms = tuple(transforms)  # what runtime.apply_plan checks
    desc = dataclasses.replace(loaded.description, fingerprint=fp)
    return dataclasses.replace(loaded, model=model, description=desc)
