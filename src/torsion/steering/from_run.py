"""A steering method built from a run directory, for the strength search and the method comparison.

The run supplies what each method steers with: its vector ``v`` (``vectors.safetensors``,
``[n_layers, d_model]``), the top-``k`` blocks the search selected, ACE's complied train mean
``μ`` and, for the splines, a manifold file (``--manifold``, else ``RUN_DIR/manifold.safetensors``).
``params`` (``--param KEY=VALUE``) override any method parameter. ``weighted-ablation``
defaults its kernel to the selected blocks: peak at their mean, width their span + 1, floor 0.

Example::

    method, record = run_method(RunDir("runs/quick"), lm, "ace", vectors=v, layers=[10, 12],
                                component="resid", positions="all")
    record   # {"name": "ace", "strength_name": "alpha", "params": {...}, "tensors_sha256": ...}
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import Tensor

from torsion.assets import sha256_file
from torsion.errors import TorsionError
from torsion.models import LoadedModel
from torsion.steering.base import SteeringMethod
from torsion.steering.registry import get_method, method_class
from torsion.store import RunDir

SPLINES = ("spline-a", "spline-b")
ABLATIONS = ("ablation", "weighted-ablation")
MANIFOLD_FILE = "manifold.safetensors"


def tensors_sha256(method: SteeringMethod) -> str:
    """One hash over the method's tensors (name, shape and float32 bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(method.tensors().items()):
        digest.update(f"{name}:{list(tensor.shape)}".encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def manifold_path(run: RunDir, manifold: str | Path | None) -> Path:
    """The manifold file the spline methods read: ``manifold`` if given, else the run's own."""
    return Path(manifold) if manifold is not None else run.root / MANIFOLD_FILE


def check_manifold(run: RunDir, name: str, manifold: str | Path | None) -> Path | None:
    """The manifold file spline method ``name`` reads (None for other methods); a missing file fails in one line."""
    if method_class(name).name not in SPLINES:
        return None
    path = manifold_path(run, manifold)
    if not path.is_file():
        raise TorsionError(f"{name} needs a manifold file and {path} does not exist; run `torsion manifold "
                           f"fit {run.root}` or pass --manifold FILE")
    return path


def run_method(run: RunDir, lm: LoadedModel, name: str, *, vectors: Tensor, layers: Sequence[int], component: str,
               positions: str, params: Mapping[str, Any] | None = None,
               manifold: str | Path | None = None) -> tuple[SteeringMethod, dict[str, Any]]:
    """Method ``name`` on the run's ``vectors`` ``[n_layers, d_model]`` and ``layers``, validated against ``lm``.

    Returns the method and its record for a study spec: name, strength name, every non-tensor
    parameter, the user's overrides, a hash of its tensors and, for splines, the manifold file and
    its sha256.
    """
    cls = method_class(name)
    given = dict(params or {})
    chosen = dict(given)
    record: dict[str, Any] = {}
    if cls.name in SPLINES:
        from torsion.manifold.file import load_manifold

        path = check_manifold(run, cls.name, manifold)
        chosen.setdefault("positions", positions)
        method = cls.from_manifold(load_manifold(path), chosen.pop("layers", layers), **chosen)
        record.update(manifold=str(path), manifold_sha256=sha256_file(path))
    elif cls.name in ABLATIONS:
        if cls.name == "weighted-ablation":
            chosen.setdefault("peak_position", sum(layers) / len(layers))
            chosen.setdefault("width", float(max(layers) - min(layers) + 1))
        method = get_method(cls.name, directions=vectors, **chosen)
    else:
        chosen = {"component": component, "positions": positions, **chosen}
        if cls.name != "dense":
            chosen.setdefault("layers", list(layers))
        if cls.name == "ace":
            from torsion.steering.ace import complied_means

            if "means" not in chosen:  # not setdefault: computing it needs the run's labelled activations
                chosen["means"] = complied_means(run.root, chosen["component"])
        method = get_method(cls.name, vectors=vectors, **chosen)
    method.validate(lm)
    record = {"name": cls.name, "strength_name": cls.strength_name, "params": method.params(),
              "given_params": given, "tensors_sha256": tensors_sha256(method), **record}
    return method, record


def every_position(method: SteeringMethod) -> SteeringMethod:
    """``method`` steering every position (perplexity and teacher-forced metrics score every position)."""
    import dataclasses

    if any(f.name == "positions" for f in dataclasses.fields(method)):
        return dataclasses.replace(method, positions="all")
    return method
