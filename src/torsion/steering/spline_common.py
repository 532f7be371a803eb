"""What the two spline methods share (methods.md, "Manifold (spline) steering"): their fields
beyond the tensors, the field checks, the coherent-range check on ``t``, and the replacement
hooks ``h' = h + β Uᵀ(s − U(h − μ))`` at each steered block.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from torsion.errors import TorsionError
from torsion.manifold.file import Manifold
from torsion.models import LoadedModel
from torsion.steering.base import MethodRecord, SteeringMethod
from torsion.steering.hooks import block_device, replace_steering, subspace_target


@dataclass(frozen=True, eq=False)
class SplineMethod(SteeringMethod):
    """The spline methods' shared, keyword-only parameters; subclasses add ``layers`` and the tensors.

    ``beta`` is the share of the way to the curve (1 = onto it); ``smoothing`` and ``knot_weights``
    are the fit's; ``t_range`` the coherent range (default the outer knots), which ``t`` must stay
    in unless ``allow_extrapolation``.
    """

    replacement = True
    strength_name = "t"
    beta: float = field(default=1.0, kw_only=True)
    smoothing: float = field(default=0.0, kw_only=True)
    knot_weights: tuple[float, ...] | None = field(default=None, kw_only=True)
    t_range: tuple[float, float] | None = field(default=None, kw_only=True)
    allow_extrapolation: bool = field(default=False, kw_only=True)
    component: str = field(default="resid", kw_only=True)
    positions: str = field(default="last", kw_only=True)

    def search_range(self, objective: str) -> tuple[float, float]:
        """The coherent ``t`` range (last coherent ``t`` per side, else the outer knots), for either objective."""
        return self.t_range

    steered_layers = property(lambda self: self.layers)


def check_t(name: str, t: float, t_range: tuple[float, float], allow_extrapolation: bool) -> None:
    """Refuse ``t`` outside ``t_range`` (the coherent range) unless extrapolation is allowed."""
    low, high = t_range
    if not allow_extrapolation and not low <= t <= high:
        raise TorsionError(f"{name} t={t} is outside the coherent range [{low:g}, {high:g}] (last coherent t, "
                           "else the outer knots); pass a t inside it or --allow-extrapolation")


def normalise_common(method: Any) -> None:
    """Shared field checks of the spline methods: beta, smoothing, t range, knot positions."""
    object.__setattr__(method, "layers", tuple(int(layer) for layer in method.layers))
    object.__setattr__(method, "beta", float(method.beta))
    object.__setattr__(method, "smoothing", float(method.smoothing))
    object.__setattr__(method, "knots_t", torch.as_tensor(method.knots_t).detach().float().cpu())
    if method.knot_weights is not None:
        weights = tuple(float(w) for w in method.knot_weights)
        if len(weights) != method.knots_t.numel() or not all(0 < w < float("inf") for w in weights):
            raise TorsionError(f"{method.name} knot_weights {list(weights)} need one positive finite weight per "
                               "knot; refit the manifold")
        object.__setattr__(method, "knot_weights", weights)
    if not method.layers:
        raise TorsionError(f"{method.name} needs at least one layer to steer; pass layers=[...]")
    if method.knots_t.ndim != 1 or method.knots_t.numel() < 2:
        raise TorsionError(f"{method.name} needs at least two knots, got knots_t of shape "
                           f"{list(method.knots_t.shape)}; refit the manifold with more bins")
    t_range = method.t_range
    if t_range is None:
        t_range = (float(method.knots_t.min()), float(method.knots_t.max()))
    low, high = (float(v) for v in t_range)
    if not low <= high:
        raise TorsionError(f"{method.name} t_range [{low}, {high}] is empty; pass low <= high")
    object.__setattr__(method, "t_range", (low, high))


def subspace_context(lm: LoadedModel, method: Any, strength: float, bases: Sequence[Tensor],
                     means: Sequence[Tensor], targets: Tensor) -> AbstractContextManager[MethodRecord]:
    """The replacement hooks of a spline method: one :func:`subspace_target` per steered block."""
    norms = tuple(abs(method.beta) * float(torch.linalg.vector_norm(s.double())) for s in targets)
    record = MethodRecord(method.name, strength, method.layers, (strength,) * len(method.layers), norms,
                          method.component, method.positions, replacement=True)
    transforms = [] if method.beta == 0 else [  # β = 0: no hook at all
        subspace_target(U, mu, s, method.beta, block_device(lm, method.component, layer))
        for layer, U, mu, s in zip(method.layers, bases, means, targets)]
    return replace_steering(lm, transforms, record)


def manifold_provenance(manifold: Manifold) -> dict[str, Any]:
    keys = ("model_id", "weights_sha256", "run_dir", "component", "k", "m", "knots")
    return {key: manifold.meta[key] for key in keys if key in manifold.meta}
