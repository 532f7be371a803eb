"""Per-request steering for the server: named vectors, the request's ``steering`` spec, limits.

A request's ``steering`` object names a method, a registered vector, blocks and a strength::

    {"method": "flat", "vector": "refusal", "layers": [10, 12], "strength": -4.0}
    {"method": "dense", "vector": "refusal", "strength": 2.0, "scale": "applied_norm"}
    {"method": "ablation", "vector": "refusal", "strength": 1.0}
    {"method": "flat", "vector": "refusal", "layers": [10], "strength": 4.0, "condition": "cyber"}

The method names and their strengths are those of the steering-method registry
(``torsion.steering.get_method``: ``flat`` α on chosen blocks, ``dense`` α or an equal
applied norm on every block, ``ablation`` the removed share β, 1 = full ablation). That
package is not on this branch's base yet, so this module is the small adapter with the same
names: each spec resolves to a :class:`RowSteering` whose per-block offsets (additive
methods) or unit directions (ablation) the batch engine applies row by row, exactly as
:func:`torsion.steer.add_steering`, :func:`~torsion.steer.dense_steering` and
:func:`~torsion.steer.ablate_direction` do for a whole batch.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from torsion.conventions import LAYER_INDEXING
from torsion.models import LoadedModel
from torsion.serve.condition import Condition
from torsion.steer import unit_directions

METHODS = ("flat", "dense", "ablation")
COMPONENTS = ("resid", "attn", "mlp")
POSITIONS = ("last", "all")
SPEC_KEYS = ("method", "vector", "layers", "strength", "scale", "component", "positions", "condition")
NAME_LIMIT = 64


class RequestError(ValueError):
    """A client error: HTTP ``status`` with a one-line OpenAI-style message."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass(frozen=True)
class NamedVector:
    """A registered steering vector: ``directions`` ``[n_layers, d_model]`` float32, with provenance."""

    name: str
    directions: Tensor
    source: str
    meta: dict[str, Any]
    registered_at: float

    def listing(self) -> dict[str, Any]:
        norms = torch.linalg.vector_norm(self.directions.double(), dim=1)
        return {"name": self.name, "shape": list(self.directions.shape), "source": self.source,
                "registered_at": int(self.registered_at), "norms": [round(float(n), 6) for n in norms],
                "meta": self.meta}


class VectorRegistry:
    """Named vectors for one model (thread-safe); names are registered once."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self._vectors: dict[str, NamedVector] = {}
        self._lock = threading.Lock()

    def add(self, name: str, directions: Any, *, source: str, meta: Mapping[str, Any] | None = None) -> NamedVector:
        """Register ``directions`` (``[d_model]`` for every block, or ``[n_layers, d_model]``)."""
        if not isinstance(name, str) or not name or len(name) > NAME_LIMIT or not name.replace("-", "").replace(
                "_", "").replace(".", "").replace("/", "").isalnum():
            raise RequestError(f"vector name {str(name)[:NAME_LIMIT]!r} is not valid; use up to {NAME_LIMIT} "
                               "letters, digits, '-', '_', '.', '/'", param="name")
        try:
            tensor = torch.as_tensor(getattr(directions, "directions", directions), dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise RequestError("vector must be a list of numbers [d_model] or a list of lists [n_layers, d_model]",
                               param="vector") from None
        lm = self.lm
        if tensor.ndim == 1 and tensor.shape[0] == lm.d_model:
            tensor = tensor.expand(lm.n_layers, -1).clone()
        if tensor.ndim != 2 or tuple(tensor.shape) != (lm.n_layers, lm.d_model):
            raise RequestError(f"vector has shape {list(tensor.shape)}; this model needs [{lm.d_model}] or "
                               f"[{lm.n_layers}, {lm.d_model}]", param="vector")
        if not torch.isfinite(tensor).all():
            raise RequestError("vector has non-finite values; send finite numbers", param="vector")
        entry = NamedVector(name, tensor.detach().cpu(), source, dict(meta or {}), time.time())
        with self._lock:
            if name in self._vectors:
                raise RequestError(f"vector {name!r} is already registered; pick another name", status=409,
                                   param="name")
            self._vectors[name] = entry
        return entry

    def get(self, name: Any) -> NamedVector:
        with self._lock:
            entry = self._vectors.get(name) if isinstance(name, str) else None
            known = sorted(self._vectors)
        if entry is None:
            raise RequestError(f"unknown vector {str(name)[:NAME_LIMIT]!r}; registered: {', '.join(known) or 'none'} "
                               "(register one with POST /v1/steering)", status=404, param="steering.vector")
        return entry

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            return [entry.listing() for entry in self._vectors.values()]


@dataclass(frozen=True)
class RowSteering:
    """One request's resolved steering.

    Additive methods: ``offsets`` maps block ``l`` to ``α_l v_l`` (``[d_model]`` float64) added
    at ``component`` on ``positions``. Ablation: ``units`` (``[n_layers, d_model]`` float32,
    ``v̂_l``) and the removed share ``strength``. ``key`` identifies the ablation direction for
    grouping rows into one hook.
    """

    method: str
    vector: str
    layers: tuple[int, ...]
    strength: float
    component: str
    positions: str
    applied_norms: tuple[float, ...]
    offsets: dict[int, Tensor] = field(default_factory=dict)
    units: Tensor | None = None
    condition: Condition | None = None

    def metadata(self, fired: bool | None) -> dict[str, Any]:
        """What a response records: method, blocks, strength, applied norm, whether the condition fired."""
        applied = fired is not False
        return {"method": self.method, "vector": self.vector, "layers": list(self.layers),
                "strength": self.strength, "component": self.component, "positions": self.positions,
                "applied_norm": list(self.applied_norms) if applied else [0.0] * len(self.layers),
                "applied": applied, "layer_indexing": LAYER_INDEXING,
                "condition": None if self.condition is None else self.condition.name, "condition_fired": fired}


def _number(spec: Mapping[str, Any], name: str) -> float:
    value = spec.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"steering.{name} must be a finite number, got {value!r}", param=f"steering.{name}")
    return float(value)


def _layers(lm: LoadedModel, value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                         for v in value):
        raise RequestError("steering.layers must be a non-empty list of block indices", param="steering.layers")
    bad = [v for v in value if not 0 <= v < lm.n_layers]
    if bad:
        raise RequestError(f"steering.layers has block {bad[0]}, out of range; this model has blocks "
                           f"0..{lm.n_layers - 1}", param="steering.layers")
    if len(set(value)) != len(value):
        raise RequestError(f"steering.layers {value} repeats a block; list each block once", param="steering.layers")
    return tuple(value)


def _choice(spec: Mapping[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    value = spec.get(name, default)
    if value not in choices:
        raise RequestError(f"steering.{name} {value!r} is not one of {', '.join(choices)}", param=f"steering.{name}")
    return value


def resolve_steering(spec: Any, lm: LoadedModel, vectors: VectorRegistry, conditions: Mapping[str, Condition],
                     *, max_applied_norm: float | None = None) -> RowSteering | None:
    """Check a request's ``steering`` object and resolve it; ``None`` or ``{"method": "none"}`` is no steering.

    Raises :class:`RequestError` (400, or 404 for an unknown vector or condition) naming the
    bad field. ``max_applied_norm`` bounds ``‖α_l v_l‖`` at every block for additive methods.
    """
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise RequestError("steering must be an object such as {\"method\": \"flat\", \"vector\": NAME, "
                           "\"layers\": [..], \"strength\": x}", param="steering")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise RequestError(f"steering has unknown field {unknown[0]!r}; valid: {', '.join(SPEC_KEYS)}",
                           param=f"steering.{unknown[0]}")
    method = spec.get("method", "flat")
    if method == "none":
        return None
    if method not in METHODS:
        raise RequestError(f"steering.method {str(method)[:40]!r} is not served; choose one of "
                           f"{', '.join(METHODS)} or none", param="steering.method")
    if "vector" not in spec:
        raise RequestError("steering.vector is missing; name a registered vector (GET /v1/steering lists them)",
                           param="steering.vector")
    entry = vectors.get(spec["vector"])
    condition = None
    if spec.get("condition") is not None:
        condition = conditions.get(spec["condition"]) if isinstance(spec["condition"], str) else None
        if condition is None:
            raise RequestError(f"unknown condition {str(spec['condition'])[:NAME_LIMIT]!r}; loaded: "
                               f"{', '.join(sorted(conditions)) or 'none'} (start the server with --condition)",
                               status=404, param="steering.condition")
    directions = entry.directions.double()
    if method == "ablation":
        for name in ("layers", "scale", "component", "positions"):
            if name in spec:
                raise RequestError(f"steering.{name} does not apply to ablation (every residual write of every "
                                   "block); remove it", param=f"steering.{name}")
        strength = _number(spec, "strength") if "strength" in spec else 1.0
        units = unit_directions(lm, entry.directions)
        layers = tuple(range(lm.n_layers))
        return RowSteering(method, entry.name, layers, strength, "attn+mlp", "all", (0.0,) * len(layers),
                           units=units, condition=condition)
    if "strength" not in spec:
        raise RequestError(f"steering.strength is missing; {method} needs a strength (alpha)",
                           param="steering.strength")
    strength = _number(spec, "strength")
    component = _choice(spec, "component", COMPONENTS, "resid")
    positions = _choice(spec, "positions", POSITIONS, "last")
    if method == "flat":
        if "scale" in spec:
            raise RequestError("steering.scale applies to dense only; remove it", param="steering.scale")
        if "layers" not in spec:
            raise RequestError("steering.layers is missing; flat steering needs the blocks to steer",
                               param="steering.layers")
        layers = _layers(lm, spec["layers"])
        alphas = [strength] * len(layers)
    else:
        if "layers" in spec:
            raise RequestError("steering.layers does not apply to dense (every block); remove it",
                               param="steering.layers")
        scale = _choice(spec, "scale", ("alpha", "applied_norm"), "alpha")
        layers = tuple(range(lm.n_layers))
        if scale == "alpha":
            alphas = [strength] * len(layers)
        else:  # dense_steering's rule: α_l = applied_norm / ‖v_l‖, 0 where v_l = 0; the sign flips the vectors
            norms = torch.linalg.vector_norm(directions, dim=1)
            alphas = [math.copysign(abs(strength) / float(n), strength) if n > 0 else 0.0 for n in norms]
    deltas = directions[list(layers)] * torch.tensor(alphas, dtype=torch.float64)[:, None]
    applied = tuple(torch.linalg.vector_norm(deltas, dim=1).tolist())
    if max_applied_norm is not None and max(applied) > max_applied_norm:
        worst = max(range(len(layers)), key=lambda i: applied[i])
        raise RequestError(f"steering strength {strength:g} gives applied norm {applied[worst]:.4g} at block "
                           f"{layers[worst]}, over the server's limit {max_applied_norm:g}; lower |strength|",
                           param="steering.strength")
    return RowSteering(method, entry.name, layers, strength, component, positions, applied,
                       offsets=dict(zip(layers, deltas)), condition=condition)
