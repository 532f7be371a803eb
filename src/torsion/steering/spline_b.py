"""``spline-b``: the rotation-aware surface (methods.md, "Manifold (spline) steering", variant B).

A thin-plate surface ``S(t, l)`` over the knots of every fitted block, in one shared basis
``U``; at steered block ``l``, ``h' = h + β Uᵀ(S(t, l) − U(h − μ_l))``, as spline A does. The
strength is ``t``, clamped to the coherent range like :mod:`torsion.steering.spline_a`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from torsion.errors import TorsionError
from torsion.manifold.file import Manifold
from torsion.manifold.fit import Surface
from torsion.models import LoadedModel
from torsion.steering.base import MethodRecord
from torsion.steering.registry import register
from torsion.steering.spline_common import SplineMethod, manifold_provenance, check_t, normalise_common, subspace_context


@register
@dataclass(frozen=True, eq=False)
class SplineB(SplineMethod):
    """``basis`` ``[k, d]``; ``means`` ``[m, d]`` and ``knots`` ``[m, n_knots, k]`` aligned with ``surface_layers``.

    ``layers`` (steered) must be among ``surface_layers``; ``depth_layers`` is the model depth
    that sets the surface's depth axis ``u = l / (depth_layers − 1)``.
    """

    name = "spline-b"
    layers: tuple[int, ...]
    surface_layers: tuple[int, ...]
    basis: Tensor
    means: Tensor
    knots: Tensor
    knots_t: Tensor
    depth_layers: int

    def _normalise(self) -> None:
        normalise_common(self)
        object.__setattr__(self, "surface_layers", tuple(int(layer) for layer in self.surface_layers))
        for key in ("basis", "means", "knots"):
            object.__setattr__(self, key, torch.as_tensor(getattr(self, key)).detach().float().cpu())
        outside = [layer for layer in self.layers if layer not in self.surface_layers]
        if outside:
            raise TorsionError(f"spline-b steers block {outside[0]} but the surface was fitted on blocks "
                               f"{list(self.surface_layers)}; steer fitted blocks or refit with --layers")

    d_model = property(lambda self: self.basis.shape[1])
    n_layers_needed = property(lambda self: max(self.surface_layers) + 1)

    def surface(self) -> Surface:
        return Surface(self.surface_layers, self.basis, self.means, self.knots, self.knots_t, self.depth_layers,
                       self.smoothing, self.knot_weights)

    @classmethod
    def from_manifold(cls, manifold: Manifold, layers: Sequence[int] | None = None, **params: Any) -> SplineB:
        """Spline B on ``layers`` (default every fitted block) of a loaded manifold file."""
        surface = manifold.b
        if surface is None:
            raise TorsionError("the manifold file has no spline B; refit with `torsion manifold fit --variant b`")
        params.setdefault("t_range", manifold.t_range())
        params.setdefault("smoothing", surface.smoothing)
        params.setdefault("knot_weights", surface.knot_weights)
        return cls(tuple(layers) if layers is not None else surface.layers, surface.layers, surface.basis,
                   surface.means, surface.knots, surface.knots_t, surface.n_layers, meta=manifold_provenance(manifold),
                   **params)

    def targets(self, t: float) -> Tensor:
        """``S(t, l)`` for each steered block, ``[n, k]``."""
        surface = self.surface()
        interpolator = surface.interpolator()
        return torch.stack([torch.from_numpy(surface.evaluate(t, layer, interpolator)) for layer in self.layers]).float()

    def validate(self, lm: LoadedModel) -> None:
        super().validate(lm)
        if self.depth_layers != lm.n_layers:
            raise TorsionError(f"spline-b was fitted on a {self.depth_layers}-block model but this one has "
                               f"{lm.n_layers}; refit the manifold for this model")

    def _context(self, lm: LoadedModel, strength: float) -> AbstractContextManager[MethodRecord]:
        check_t(self.name, strength, self.t_range, self.allow_extrapolation)
        surface = self.surface()
        return subspace_context(lm, self, strength, [self.basis] * len(self.layers),
                                [surface.mean_of(layer) for layer in self.layers], self.targets(strength))
