"""The method file: one format for every steering method.

A safetensors file. Tensors: the method's tensor fields, by field name. ``__metadata__``
(string to string): ``format`` (``torsion.steering-method/1``), ``method`` (registry name),
``params`` (JSON of the other fields), ``meta`` (JSON provenance: model id, weights hash,
sources) and ``torsion_version``. Read with safetensors only; nothing is unpickled.

Example::

    method.save("flat.safetensors")
    method = load_method("flat.safetensors", lm=lm)   # refuses another width or model
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

import torsion
from torsion.errors import TorsionError
from torsion.models import LoadedModel
from torsion.steering.base import FORMAT, SteeringMethod
from torsion.steering.registry import method_class
from torsion.store import atomic_write_bytes


def save_method(method: SteeringMethod, path: str | Path) -> Path:
    """Write ``method`` to ``path`` atomically; returns the path."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in method.tensors().items()}
    metadata = {"format": FORMAT, "method": method.name, "params": json.dumps(method.params(), sort_keys=True),
                "meta": json.dumps(dict(method.meta), sort_keys=True), "torsion_version": torsion.__version__}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))
    return path


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The ``__metadata__`` map and tensors of a safetensors file, or a one-line error naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise TorsionError(f"{what} {path} not found; check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise TorsionError(f"{path} is not a readable safetensors {what} ({error}); write it again") from None
    return metadata, tensors


def load_method(path: str | Path, *, lm: LoadedModel | None = None) -> SteeringMethod:
    """Read a method file; with ``lm``, validate it against the model (width, blocks, identity)."""
    metadata, tensors = read_safetensors(path, "method file")
    if metadata.get("format") != FORMAT:
        raise TorsionError(f"{path} is not a steering-method file (format {metadata.get('format')!r}); "
                           "pass a file written by SteeringMethod.save")
    cls = method_class(metadata["method"])
    params = json.loads(metadata["params"])
    method = cls(**params, **tensors, meta=json.loads(metadata.get("meta", "{}")))
    if lm is not None:
        method.validate(lm)
    return method
