"""``dense``: addition on every block, one ``α`` or an equal applied norm (methods.md, "Steering")."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

from torch import Tensor

from torsion.errors import TorsionError
from torsion.models import LoadedModel
from torsion.steer import dense_steering
from torsion.steering.base import MethodRecord, SteeringMethod, as_matrix
from torsion.steering.flat import additive_context
from torsion.steering.registry import register

SCALES = ("alpha", "applied_norm")


@register
@dataclass(frozen=True, eq=False)
class Dense(SteeringMethod):
    """Every block with its own vector. ``scale="alpha"``: strength is one ``α`` for every block;
    ``scale="applied_norm"``: strength is ``‖α_l v_l‖``, equal at every block (its sign flips
    the vectors, so one signed number steers either way)."""

    name = "dense"
    vectors: Tensor
    scale: str = "alpha"
    component: str = "resid"
    positions: str = "last"

    def _normalise(self) -> None:
        object.__setattr__(self, "vectors", as_matrix(self.vectors, "dense vectors"))
        if self.scale not in SCALES:
            raise TorsionError(f"unknown dense scale {self.scale!r}; choose alpha or applied_norm")

    d_model = property(lambda self: self.vectors.shape[1])
    n_layers_needed = property(lambda self: self.vectors.shape[0])
    steered_layers = property(lambda self: tuple(range(self.vectors.shape[0])))

    def validate(self, lm: LoadedModel) -> None:
        super().validate(lm)
        if self.vectors.shape[0] != lm.n_layers:
            raise TorsionError(f"dense steering needs one vector per block ({lm.n_layers}), got "
                               f"{self.vectors.shape[0]}; use a vector computed for every layer of this model")

    def _context(self, lm: LoadedModel, strength: float) -> AbstractContextManager[MethodRecord]:
        if self.scale == "alpha":
            inner = dense_steering(lm, self.vectors, alpha=strength, component=self.component,
                                   positions=self.positions)
        else:
            vectors = self.vectors if strength >= 0 else -self.vectors
            inner = dense_steering(lm, vectors, applied_norm=abs(strength), component=self.component,
                                   positions=self.positions)
        return additive_context(self.name, strength, inner)
