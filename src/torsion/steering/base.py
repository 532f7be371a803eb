"""The steering-method protocol (methods.md, "Comparing steering methods").

A method is a small frozen value. ``method.apply(lm, strength)`` is a context manager that
installs the method's hooks, yields a :class:`MethodRecord` of what it applied per block,
and removes the hooks on exit. ``method.validate(lm)`` checks width and block range;
``save``/``load`` write one file format for every method: a safetensors file whose tensors
are the method's tensor fields and whose metadata holds the method name, its other
parameters and the provenance (model id, weights hash, torsion version) as JSON.

A method's fields are its parameters: every ``Tensor`` field is stored as a tensor, every
other field as JSON. Subclasses normalise fields in ``_normalise`` (tuples, float32), so a
loaded method equals the saved one field by field.

Example::

    method = get_method("flat", vectors=axis.directions, layers=[10, 12])
    with method.apply(lm, -4.0) as record:
        lm.model.generate(**inputs)
    record.conventions()            # per block: strength, applied norm, mean ||h' - h||
    steer = method.factory(lm, -4.0)   # a torsion.metrics SteerFactory
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor

from torsion.conventions import LAYER_INDEXING
from torsion.errors import TorsionError
from torsion.models import LoadedModel

FORMAT = "torsion.steering-method/1"


@dataclass
class MethodRecord:
    """What one ``apply`` context applied, per steered block (aligned with ``layers``).

    ``strengths`` is the per-block strength (``α_l``, ``t`` or the ablation weight),
    ``applied_norms`` the norm of the state-independent term (additive: ``‖α_l v_l‖``; ACE:
    ``β|α|``; splines: ``β‖s(t)‖``; ablation: 0). Replacement methods also measure
    ``‖h' − h‖`` over every steered token: :meth:`mean_delta_norms` (None for additive methods).
    """

    method: str
    strength: float
    layers: tuple[int, ...]
    strengths: tuple[float, ...]
    applied_norms: tuple[float, ...]
    component: str
    positions: str
    phase: str = "both"
    replacement: bool = False
    _delta_sums: list[Any] = field(default_factory=list, init=False, repr=False)
    _delta_counts: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.replacement:
            self._delta_sums = [0.0] * len(self.layers)
            self._delta_counts = [0] * len(self.layers)

    @property
    def steered_tokens(self) -> list[int]:
        """Token positions steered so far per block (replacement methods; empty for additive ones)."""
        return list(self._delta_counts)

    @property
    def alpha(self) -> tuple[float, ...]:
        """The per-block strengths, under the name :class:`torsion.steer.SteeringRecord` uses."""
        return self.strengths

    def observe(self, index: int, delta: Tensor) -> None:
        """Accumulate ``‖h' − h‖`` of ``delta`` (``[..., d_model]``) for block ``layers[index]``, without a sync."""
        norms = torch.linalg.vector_norm(delta.float(), dim=-1)
        self._delta_sums[index] = self._delta_sums[index] + norms.sum()
        self._delta_counts[index] += norms.numel()

    def mean_delta_norms(self) -> list[float | None] | None:
        """Mean ``‖h' − h‖`` per block over the token positions steered so far (None before any).

        Read it when the context's work is done, as :func:`torsion.behaviour.evaluate_behaviour`
        does; read on entering the context it is None.
        """
        if not self.replacement:
            return None
        return [float(s) / c if c else None for s, c in zip(self._delta_sums, self._delta_counts)]

    def conventions(self) -> dict[str, Any]:
        """The fields every steered output records; ``alpha``/``applied_norm`` as add_steering names them."""
        return {"method": self.method, "strength": self.strength, "layers": list(self.layers),
                "alpha": list(self.strengths), "applied_norm": list(self.applied_norms),
                "mean_delta_norm": self.mean_delta_norms(), "component": self.component,
                "positions": self.positions, "phase": self.phase, "layer_indexing": LAYER_INDEXING}


@dataclass(frozen=True, eq=False)
class SteeringMethod:
    """Base of every method: a frozen value with ``apply``, ``validate``, ``save`` and ``factory``.

    Subclasses are dataclasses that set ``name`` (the registry name) and ``replacement``, and
    implement ``_context`` (the hooks), ``d_model``, ``n_layers_needed`` and ``steered_layers``.
    ``meta`` is provenance (model id, weights hash, the source file, ...), JSON.
    """

    name: ClassVar[str] = ""
    replacement: ClassVar[bool] = False
    strength_name: ClassVar[str] = "alpha"  # what the one strength is called: alpha, beta (ablations) or t (splines)
    meta: Mapping[str, Any] = field(default_factory=dict, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", dict(self.meta))
        self._normalise()

    def _normalise(self) -> None:
        """Coerce fields to canonical types (tuples, float32 tensors) and check their shapes."""

    @property
    def d_model(self) -> int:
        raise NotImplementedError

    @property
    def n_layers_needed(self) -> int:
        """The fewest blocks a model must have (the method's tensors cover blocks 0 … n-1)."""
        raise NotImplementedError

    @property
    def steered_layers(self) -> tuple[int, ...]:
        raise NotImplementedError

    def search_range(self, objective: str) -> tuple[float, float]:
        """The default strength-search range for ``objective`` (comply or refuse).

        Additive methods: ``α ∈ [−4, 0]`` to comply, ``[0, 4]`` to refuse (the raw multiplier of ``v_l``).
        """
        return {"comply": (-4.0, 0.0), "refuse": (0.0, 4.0)}[objective]

    def validate(self, lm: LoadedModel) -> None:
        """Refuse a model of another width, depth, or identity (one-line :class:`TorsionError`)."""
        if self.d_model != lm.d_model:
            raise TorsionError(f"{self.name} method has d_model={self.d_model} but the model has {lm.d_model}; "
                               "use a method fitted for this model")
        if self.n_layers_needed > lm.n_layers:
            raise TorsionError(f"{self.name} method covers {self.n_layers_needed} blocks but the model has "
                               f"{lm.n_layers}; use a method fitted for this model")
        bad = [layer for layer in self.steered_layers if not 0 <= layer < lm.n_layers]
        if bad:
            raise TorsionError(f"{self.name} method steers block {bad[0]}, out of range; this model has blocks "
                               f"0..{lm.n_layers - 1}")
        check_same_model(self.meta, lm, what=f"{self.name} method")

    def apply(self, lm: LoadedModel, strength: float) -> AbstractContextManager[MethodRecord]:
        """Install the hooks for ``strength`` (``α`` or ``t``); the context yields a :class:`MethodRecord`."""
        self.validate(lm)
        strength = float(strength)
        if strength != strength or strength in (float("inf"), float("-inf")):
            raise TorsionError(f"{self.name} strength is {strength}; pass a finite number")
        return self._context(lm, strength)

    def _context(self, lm: LoadedModel, strength: float) -> AbstractContextManager[MethodRecord]:
        raise NotImplementedError

    def factory(self, lm: LoadedModel, strength: float) -> Callable[[], AbstractContextManager[MethodRecord]]:
        """A zero-argument :data:`torsion.metrics.SteerFactory` for ``strength``."""
        self.validate(lm)
        return lambda: self.apply(lm, strength)

    def bind(self, lm: LoadedModel) -> Callable[[float], Callable[[], AbstractContextManager[MethodRecord]]]:
        """``strength ↦`` a SteerFactory on ``lm`` (what the strength search calls per trial)."""
        self.validate(lm)
        return lambda strength: (lambda: self.apply(lm, strength))

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)}

    def params(self) -> dict[str, Any]:
        """The non-tensor parameters, JSON-ready (``meta`` excluded)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)
                if f.name != "meta" and not isinstance(getattr(self, f.name), Tensor)}

    def save(self, path: str | Path) -> Path:
        """Write the method file (safetensors, atomic); see :func:`torsion.steering.io.save_method`."""
        from torsion.steering.io import save_method

        return save_method(self, path)


def matched_norm(records: list[MethodRecord]) -> float:
    """One block's norm over several ``apply`` contexts of one method (the first steered block of each):
    the applied norm, or for replacement methods the mean ``‖h' − h‖`` over every steered token of every
    context (weighted by tokens; 0 when none was steered)."""
    if not records[0].replacement:
        return float(records[0].applied_norms[0])
    total = sum(float(r.mean_delta_norms()[0] or 0.0) * r.steered_tokens[0] for r in records)
    count = sum(r.steered_tokens[0] for r in records)
    return total / count if count else 0.0


def at_block(method: SteeringMethod, block: int) -> SteeringMethod:
    """``method`` steering block ``block`` alone (its ``layers`` replaced, or its ``at_layers`` where its tensors
    are aligned with them); a method without layers fails in one line."""
    import dataclasses

    if hasattr(method, "at_layers"):
        return method.at_layers((int(block),))
    if not any(f.name == "layers" for f in fields(method)):
        raise TorsionError(f"{method.name} steers every block at once, so it cannot be injected at one block; "
                           "choose a method with layers (flat, ace, spline-a, spline-b)")
    return dataclasses.replace(method, layers=(int(block),))


def check_same_model(meta: Mapping[str, Any], lm: LoadedModel, *, what: str) -> None:
    """Refuse ``meta`` recorded for another model: weights hash when both sides know it, else model id."""
    theirs, ours = meta.get("weights_sha256"), lm.weights_sha256
    if theirs and ours and theirs != ours:
        raise TorsionError(f"{what} was fitted on model {meta.get('model_id')} (weights {theirs[:12]}) but the "
                           f"model is {lm.model_id} (weights {ours[:12]}); refit it for this model")
    if not (theirs and ours) and meta.get("model_id") and meta["model_id"] != lm.model_id:
        raise TorsionError(f"{what} was fitted on model {meta['model_id']} but the model is {lm.model_id}; "
                           "refit it for this model")


def provenance(lm: LoadedModel | None = None, **extra: Any) -> dict[str, Any]:
    """Provenance for ``meta``: the model's id and weights hash, and anything else given."""
    meta: dict[str, Any] = {}
    if lm is not None:
        meta.update(model_id=lm.model_id, weights_sha256=lm.weights_sha256)
    meta.update(extra)
    return meta


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def as_matrix(value: Any, what: str) -> Tensor:
    """A detached float32 ``[n_layers, d_model]`` tensor from a SteeringVector or a tensor."""
    tensor = getattr(value, "directions", value)
    if not isinstance(tensor, Tensor):
        tensor = torch.as_tensor(tensor)
    tensor = tensor.detach().float().cpu()
    if tensor.ndim != 2:
        raise TorsionError(f"{what} has shape {list(tensor.shape)}; pass [n_layers, d_model], one row per block")
    if not torch.isfinite(tensor).all():
        raise TorsionError(f"{what} has non-finite values; recompute it")
    return tensor
