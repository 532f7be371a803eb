"""The steering-vector value type and its safetensors file.

A :class:`SteeringVector` is a value, like repeng's ``ControlVector``: directions
``[n_layers, d_model]`` plus the provenance that made them, with algebra that keeps a record
of the operation. A vector file is safetensors (never pickle): one tensor per key, and in the
string-to-string ``__metadata__`` one JSON string per key under ``meta:<key>`` plus the run's
own record under ``torsion:run``.

Example::

    axis = (refusal - 0.5 * other).normalized()
    save_vectors("vectors.safetensors", {"md/resid": axis}, run_meta={"seed": 0})
    axis = load_vector("vectors.safetensors", "md/resid", d_model=896)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

import torsion
from torsion.errors import TorsionError
from torsion.store import atomic_write_bytes

# Provenance that survives algebra when every operand agrees on it.
_SHARED_PROVENANCE = ("model_id", "weights_sha256", "component", "position", "layer_indexing")
SINGLE_KEY = "vector"  # the tensor name SteeringVector.save writes


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """Directions ``[n_layers, d_model]`` (float32; layer ``l`` = decoder block ``l``) and provenance.

    ``meta`` holds JSON-serialisable provenance: method, params, component, position,
    ``layer_indexing``, model id, weights hash, class sizes, anchor, prompt-ids hash, torsion
    version. Vectors compare by identity; compare ``directions`` with ``torch.equal``.
    """

    directions: Tensor
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.directions.ndim != 2:
            raise TorsionError(f"a steering vector is [n_layers, d_model], got shape "
                               f"{list(self.directions.shape)}; pass one direction per layer")
        object.__setattr__(self, "directions", self.directions.detach().float())
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def n_layers(self) -> int:
        return self.directions.shape[0]

    @property
    def d_model(self) -> int:
        return self.directions.shape[1]

    def layer(self, l: int) -> Tensor:
        """The direction at block ``l``, ``[d_model]``. Negative indices are refused, not wrapped."""
        if not 0 <= l < self.n_layers:
            raise TorsionError(f"layer {l} is out of range for a vector with {self.n_layers} layers; "
                               f"use 0..{self.n_layers - 1}")
        return self.directions[l]

    def norms(self) -> Tensor:
        """Euclidean norm of each layer's direction, ``[n_layers]``."""
        return torch.linalg.vector_norm(self.directions.double(), dim=1).float()

    def normalized(self) -> SteeringVector:
        """Each layer scaled to unit norm; an all-zero layer stays zero."""
        norms = torch.linalg.vector_norm(self.directions.double(), dim=1, keepdim=True)
        unit = self.directions.double() / torch.where(norms > 0, norms, torch.ones_like(norms))
        return self._derived(unit, "a / |a| per layer", self)

    def __add__(self, other: object) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        self._check_same_shape(other, "add")
        return self._derived(self.directions.double() + other.directions.double(), "a + b", self, other)

    def __sub__(self, other: object) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        self._check_same_shape(other, "subtract")
        return self._derived(self.directions.double() - other.directions.double(), "a - b", self, other)

    def __mul__(self, scale: object) -> SteeringVector:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return NotImplemented
        return self._derived(self.directions.double() * scale, "k * a", self, scale=float(scale))

    __rmul__ = __mul__

    def __truediv__(self, scale: object) -> SteeringVector:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return NotImplemented
        return self._derived(self.directions.double() / scale, "a / k", self, scale=float(scale))

    def __neg__(self) -> SteeringVector:
        return self._derived(-self.directions.double(), "-a", self)

    def save(self, path: str | Path) -> None:
        """Write this vector alone to a vector file, under the key ``"vector"``."""
        save_vectors(path, {SINGLE_KEY: self}, run_meta={})

    @staticmethod
    def load(path: str | Path, key: str | None = None, *, d_model: int | None = None) -> SteeringVector:
        """Read one vector from a file; see :func:`load_vector`."""
        return load_vector(path, key, d_model=d_model)

    def _check_same_shape(self, other: SteeringVector, verb: str) -> None:
        if self.directions.shape != other.directions.shape:
            raise TorsionError(
                f"cannot {verb} steering vectors of shape {list(self.directions.shape)} and "
                f"{list(other.directions.shape)}; use vectors computed for the same model and layers")

    @staticmethod
    def _derived(directions: Tensor, op: str, *operands: SteeringVector, **params: float) -> SteeringVector:
        """A result of algebra: its meta names the operation and keeps the operands' meta."""
        metas = [operand.meta for operand in operands]
        shared = {key: metas[0][key] for key in _SHARED_PROVENANCE
                  if key in metas[0] and all(m.get(key) == metas[0][key] for m in metas)}
        return SteeringVector(directions.float(), {"op": op, **params, **shared, "operands": metas})


def save_vectors(path: str | Path, vectors: Mapping[str, SteeringVector], *, run_meta: Mapping[str, Any]) -> None:
    """Write ``vectors`` (key -> vector) to a safetensors file at ``path``, atomically.

    Each vector's meta goes, as JSON, under ``meta:<key>``; ``run_meta`` goes under
    ``torsion:run`` and the torsion version under ``torsion:version``. The pipeline's keys are
    ``<method>/<component>`` and ``<method>/<component>/<category>``.
    """
    if not vectors:
        raise TorsionError(f"no vectors to save to {path}; fit at least one vector first")
    tensors = {key: vector.directions.detach().cpu().contiguous() for key, vector in vectors.items()}
    metadata = {f"meta:{key}": json.dumps(dict(vector.meta), sort_keys=True) for key, vector in vectors.items()}
    metadata["torsion:run"] = json.dumps(dict(run_meta), sort_keys=True)
    metadata["torsion:version"] = torsion.__version__
    atomic_write_bytes(Path(path), safetensors_bytes(tensors, metadata))


def load_vectors(path: str | Path, *, d_model: int | None = None) -> dict[str, SteeringVector]:
    """Read every vector of a vector file, key -> vector.

    ``d_model``, when given, is the model's width; a file of another width is refused, as is any
    tensor that is not a finite, non-empty ``[n_layers, d_model]`` real matrix.
    """
    path = Path(path)
    metadata, tensors = _read(path)
    vectors = {}
    for key, tensor in tensors.items():
        if tensor.ndim != 2 or 0 in tensor.shape:
            raise TorsionError(f"tensor {key!r} in {path} has shape {list(tensor.shape)}, not "
                               "[n_layers, d_model]; pass a vector file, not an activations file")
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise TorsionError(f"tensor {key!r} in {path} is {tensor.dtype}, not real numbers; pass a vector file")
        if d_model is not None and tensor.shape[1] != d_model:
            raise TorsionError(f"vector file {path} has d_model={tensor.shape[1]} but the model has "
                               f"{d_model}; use vectors computed for this model")
        tensor = tensor.float()
        if not bool(torch.isfinite(tensor).all()):
            raise TorsionError(f"vector {key!r} in {path} holds non-finite values (inf or nan); compute the "
                               "vectors again")
        vectors[key] = SteeringVector(tensor, _json_object(path, metadata, f"meta:{key}"))
    return vectors


def load_vector(path: str | Path, key: str | None = None, *, d_model: int | None = None) -> SteeringVector:
    """Read one vector. ``key`` may be None when the file holds exactly one vector."""
    vectors = load_vectors(path, d_model=d_model)
    keys = ", ".join(sorted(vectors))
    if key is None:
        if len(vectors) != 1:
            raise TorsionError(f"vector file {path} holds {len(vectors)} vectors ({keys}); pass the key of one")
        return next(iter(vectors.values()))
    if key not in vectors:
        raise TorsionError(f"vector file {path} has no vector {key!r}; choose one of {keys}")
    return vectors[key]


def vector_keys(path: str | Path) -> list[str]:
    """The keys of a vector file, read from its header alone (no tensor is loaded)."""
    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return sorted(handle.keys())
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError, MemoryError) as error:
        raise _not_a_vector_file(path, error) from None


def load_run_meta(path: str | Path) -> dict[str, Any]:
    """The ``run_meta`` that :func:`save_vectors` recorded in a vector file."""
    metadata, _ = _read(Path(path))
    return _json_object(Path(path), metadata, "torsion:run")


def _json_object(path: Path, metadata: Mapping[str, str], name: str) -> dict[str, Any]:
    """The JSON object stored under ``name`` in a vector file's metadata (``{}`` when absent)."""
    try:
        value = json.loads(metadata.get(name, "{}"))
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise TorsionError(f"{path} metadata {name!r} is not a JSON object; the file is damaged or was not "
                           "written by torsion, compute the vectors again")
    return value


def _read(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The ``__metadata__`` map and the tensors of a non-empty vector file."""
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError, MemoryError) as error:
        raise _not_a_vector_file(path, error) from None
    if not tensors:
        raise TorsionError(f"vector file {path} holds no vectors; compute the vectors again")
    return metadata, tensors


def _not_a_vector_file(path: Path, error: Exception) -> TorsionError:
    return TorsionError(f"{path} is not a safetensors vector file ({type(error).__name__}: {error}); pass a "
                        "file written by torsion's save_vectors")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise TorsionError(f"vector file {path} not found; run `torsion run` first or pass the path "
                           "of a vectors.safetensors file")
    if path.stat().st_size == 0:
        raise TorsionError(f"vector file {path} is empty (0 bytes); it was not written completely, "
                           "compute the vectors again")
