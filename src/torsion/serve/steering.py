"""Per-request steering for the server: named vectors and methods, the request's ``steering`` spec, limits.

A request's ``steering`` object names a method of the steering-method registry
(:func:`torsion.steering.get_method`), a registered entry, and one strength::

    {"method": "flat", "vector": "refusal", "layers": [10, 12], "strength": -4.0}
    {"method": "dense", "vector": "refusal", "strength": 2.0, "scale": "applied_norm"}
    {"method": "ablation", "vector": "refusal"}                      # strength 1 = full ablation
    {"method": "weighted-ablation", "vector": "refusal", "strength": 1.0,
     "params": {"peak_position": 12, "width": 6}}
    {"vector": "spline", "strength": 0.8}        # a method file registered with --method-file
    {"method": "flat", "vector": "refusal", "layers": [10], "strength": 4.0, "condition": "cyber"}

A vector entry (``--vector`` or ``POST /v1/steering``) builds ``flat``, ``dense``, ``ablation``,
``weighted-ablation`` or ``ace`` (ace's ``means`` come in ``params``); a method-file entry
(``--method-file``: any saved method, e.g. ``ace``, ``spline-a``, ``spline-b``) is used as
saved, with the request's strength; a spline's strength ``t`` must lie in its recorded
coherent range. The additive and ablation methods resolve to per-row offsets and unit
directions the batch engine applies row by row, exactly as the methods' own hooks do; every
other method runs its own hooks over a sub-batch of rows with the same method and strength.
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
from torsion.errors import TorsionError
from torsion.serve.condition import Condition
from torsion.steer import unit_directions
from torsion.steering import SteeringMethod, get_method, method_names
from torsion.steering.registry import method_class

PER_ROW = ("flat", "dense", "ablation", "weighted-ablation")  # applied row by row in one forward
ABLATIONS = ("ablation", "weighted-ablation")
SPEC_KEYS = ("method", "vector", "layers", "strength", "scale", "component", "positions", "beta", "params",
             "condition")
NAME_LIMIT = 64
MAX_ENTRIES = 256  # registered vectors and methods, so POST /v1/steering cannot grow memory without bound
COMPONENTS = ("resid", "attn", "mlp")
POSITIONS = ("last", "all")


class RequestError(ValueError):
    """A client error: HTTP ``status`` with a one-line OpenAI-style message."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass(frozen=True)
class NamedVector:
    """A registered entry: ``directions`` ``[n_layers, d_model]`` float32, or a saved ``method``; with provenance."""

    name: str
    directions: Tensor | None
    source: str
    meta: dict[str, Any]
    registered_at: float
    method: SteeringMethod | None = None

    def listing(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "kind": "vector" if self.method is None else "method",
                                 "source": self.source, "registered_at": int(self.registered_at), "meta": self.meta}
        if self.method is not None:
            entry.update(method=self.method.name, params=self.method.params())
        else:
            norms = torch.linalg.vector_norm(self.directions.double(), dim=1)
            entry.update(shape=list(self.directions.shape), norms=[round(float(n), 6) for n in norms])
        return entry


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or len(name) > NAME_LIMIT or not name.replace("-", "").replace(
            "_", "").replace(".", "").replace("/", "").isalnum():
        raise RequestError(f"name {str(name)[:NAME_LIMIT]!r} is not valid; use up to {NAME_LIMIT} letters, digits, "
                           "'-', '_', '.', '/'", param="name")


class VectorRegistry:
    """Named vectors and method files for one model (thread-safe); names are registered once."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self._vectors: dict[str, NamedVector] = {}
        self._lock = threading.Lock()

    def _insert(self, entry: NamedVector) -> NamedVector:
        with self._lock:
            if len(self._vectors) >= MAX_ENTRIES:
                raise RequestError(f"the server holds {MAX_ENTRIES} vectors and methods, its limit; restart it "
                                   "with the ones you need", status=409, param="name")
            if entry.name in self._vectors:
                raise RequestError(f"{entry.name!r} is already registered; pick another name", status=409,
                                   param="name")
            self._vectors[entry.name] = entry
        return entry

    def add(self, name: str, directions: Any, *, source: str, meta: Mapping[str, Any] | None = None) -> NamedVector:
        """Register ``directions`` (``[d_model]`` for every block, or ``[n_layers, d_model]``)."""
        _check_name(name)
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
        return self._insert(NamedVector(name, tensor.detach().cpu(), source, dict(meta or {}), time.time()))

    def add_method(self, name: str, method: SteeringMethod, *, source: str) -> NamedVector:
        """Register a saved steering method (validated against the model)."""
        _check_name(name)
        method.validate(self.lm)
        return self._insert(NamedVector(name, None, source, dict(method.meta), time.time(), method))

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
    at ``component`` on ``positions``. Ablations: ``units`` (``[n_layers, d_model]`` float32,
    ``v̂_l``) and the removed share per block, ``weights``. Any other method: ``hooked``, the
    method object, applied with its own hooks to a sub-batch (``applied_norms`` None until run).
    """

    method: str
    vector: str
    layers: tuple[int, ...]
    strength: float
    component: str
    positions: str
    applied_norms: tuple[float, ...] | None
    offsets: dict[int, Tensor] = field(default_factory=dict)
    units: Tensor | None = None
    unit_key: str = ""
    weights: tuple[float, ...] = ()
    hooked: SteeringMethod | None = None
    condition: Condition | None = None

    def metadata(self, fired: bool | None, record: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What a response records: method, blocks, strength, applied norm, whether the condition fired.

        ``record`` is the method's :meth:`MethodRecord.conventions` for a hooked method.
        """
        applied = fired is not False
        norms = list(self.applied_norms) if self.applied_norms is not None else \
            (record or {}).get("applied_norm")
        layers = list(self.layers) if self.hooked is None else (record or {}).get("layers", list(self.layers))
        return {"method": self.method, "vector": self.vector, "layers": layers,
                "strength": self.strength, "component": self.component, "positions": self.positions,
                "applied_norm": norms if applied else [0.0] * len(layers), "applied": applied,
                "layer_indexing": LAYER_INDEXING,
                "condition": None if self.condition is None else self.condition.name, "condition_fired": fired}


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"steering.{name} must be a finite number, got {str(value)[:40]!r}",
                           param=f"steering.{name}")
    return float(value)


def _build(name: str, entry: NamedVector, spec: Mapping[str, Any], lm: LoadedModel) -> SteeringMethod:
    """The registry method ``name`` over a vector entry, from the spec's parameters."""
    params = dict(spec.get("params") or {})
    if not isinstance(spec.get("params", {}), dict):
        raise RequestError("steering.params must be an object of method parameters", param="steering.params")
    layers = spec.get("layers", [0])
    if not isinstance(layers, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        raise RequestError("steering.layers must be a list of block indices", param="steering.layers")
    for key in ("layers", "scale", "component", "positions", "beta"):
        if key in spec:
            params[key] = spec[key]
    if "means" in params:
        params["means"] = torch.as_tensor(params["means"], dtype=torch.float32)
    tensor_field = "directions" if name in ABLATIONS else "vectors"
    params[tensor_field] = entry.directions
    meta = {"vector": entry.name, "source": entry.source}
    method = get_method(name, meta=meta, **params)
    method.validate(lm)
    return method


def _row(method: SteeringMethod, vector: str, strength: float, lm: LoadedModel, condition: Condition | None,
         max_applied_norm: float | None) -> RowSteering:
    """Compile ``method`` at ``strength`` to per-row offsets or units, or keep it hooked."""
    name = method.name
    if name in ABLATIONS:
        weights = tuple(float(w) for w in method.block_weights(lm, strength))
        index = getattr(method, "direction_index", None)
        return RowSteering(name, vector, tuple(range(lm.n_layers)), strength, "attn+mlp", "all",
                           (0.0,) * lm.n_layers, units=unit_directions(lm, method.unit_source()),
                           unit_key=f"{vector}@{index}", weights=weights, condition=condition)
    if name in ("flat", "dense"):
        if method.component not in COMPONENTS or method.positions not in POSITIONS:
            raise RequestError(f"steering component {method.component!r} or positions {method.positions!r} is not "
                               f"served; choose component {', '.join(COMPONENTS)} and positions {', '.join(POSITIONS)}",
                               param="steering")
        if len(set(method.steered_layers)) != len(method.steered_layers):
            raise RequestError(f"steering.layers {list(method.steered_layers)} repeats a block; list each once",
                               param="steering.layers")
        directions = method.vectors.double()
        if name == "flat":
            layers, alphas = method.layers, [strength] * len(method.layers)
        else:
            layers = tuple(range(lm.n_layers))
            if method.scale == "alpha":
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
        return RowSteering(name, vector, tuple(layers), strength, method.component, method.positions, applied,
                           offsets=dict(zip(layers, deltas)), condition=condition)
    t_range = getattr(method, "t_range", None)
    if t_range is not None and not getattr(method, "allow_extrapolation", False) and \
            not t_range[0] <= strength <= t_range[1]:
        raise RequestError(f"{name} t={strength:g} is outside the recorded coherent range [{t_range[0]:g}, "
                           f"{t_range[1]:g}]; pass a t inside it", param="steering.strength")
    if max_applied_norm is not None and name == "ace" and method.beta * abs(strength) > max_applied_norm:
        raise RequestError(f"ace strength {strength:g} gives applied norm {method.beta * abs(strength):.4g}, over "
                           f"the server's limit {max_applied_norm:g}; lower |strength|", param="steering.strength")
    return RowSteering(name, vector, tuple(method.steered_layers), strength, getattr(method, "component", "resid"),
                       getattr(method, "positions", "last"), None, hooked=method, condition=condition)


def resolve_steering(spec: Any, lm: LoadedModel, vectors: VectorRegistry, conditions: Mapping[str, Condition],
                     *, max_applied_norm: float | None = None) -> RowSteering | None:
    """Check a request's ``steering`` object and resolve it; ``None`` or ``{"method": "none"}`` is no steering.

    Raises :class:`RequestError` (400, or 404 for an unknown vector or condition) naming the
    bad field. ``max_applied_norm`` bounds ``‖α_l v_l‖`` at every block (flat, dense) and
    ``β|α|`` (ace); a spline's ``t`` is bounded by its recorded coherent range.
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
    if spec.get("method") == "none":
        return None
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
    try:
        if entry.method is not None:
            extra = sorted(set(spec) - {"method", "vector", "strength", "condition"})
            if extra:
                raise RequestError(f"steering.{extra[0]} does not apply to the saved method {entry.name!r}; remove it",
                                   param=f"steering.{extra[0]}")
            method = entry.method
            if "method" in spec and method_class(str(spec["method"])).name != method.name:
                raise RequestError(f"{entry.name!r} is a saved {method.name} method, not {spec['method']}; drop "
                                   "steering.method or fix it", param="steering.method")
        else:
            method = _build(method_class(str(spec.get("method", "flat"))).name, entry, spec, lm)
        if "strength" in spec:
            strength = _number(spec["strength"], "strength")
        elif method.name in ABLATIONS:
            strength = 1.0
        else:
            raise RequestError(f"steering.strength is missing; {method.name} needs one strength (alpha or t)",
                               param="steering.strength")
        return _row(method, entry.name, strength, lm, condition, max_applied_norm)
    except RequestError:
        raise
    except TorsionError as error:  # the method's own checks: unknown method or parameter, shapes, blocks
        raise RequestError(f"steering: {error}", param="steering") from None
    except (TypeError, ValueError, RuntimeError) as error:  # a parameter of the wrong type
        raise RequestError(f"steering has a parameter of the wrong type ({error}); see GET /v1/steering",
                           param="steering") from None


def served_methods() -> list[str]:
    """Every method a request may name (per-row ones are batched with any other row)."""
    return method_names()
