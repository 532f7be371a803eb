"""``flat``: addition ``h' = h + α v_l`` on chosen blocks (methods.md, "Steering")."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Iterator

from torch import Tensor

from torsion.errors import TorsionError
from torsion.models import LoadedModel
from torsion.steer import add_steering
from torsion.steering.base import MethodRecord, SteeringMethod, as_matrix
from torsion.steering.registry import register


@register
@dataclass(frozen=True, eq=False)
class Flat(SteeringMethod):
    """One ``α`` on every chosen block: ``h' = h + α v_l``. ``vectors`` is ``[n_layers, d_model]``."""

    name = "flat"
    vectors: Tensor
    layers: tuple[int, ...]
    component: str = "resid"
    positions: str = "last"

    def _normalise(self) -> None:
        object.__setattr__(self, "vectors", as_matrix(self.vectors, "flat vectors"))
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        if not self.layers:
            raise TorsionError("flat steering needs at least one layer; pass layers=[...]")

    d_model = property(lambda self: self.vectors.shape[1])
    n_layers_needed = property(lambda self: self.vectors.shape[0])
    steered_layers = property(lambda self: self.layers)

    def _context(self, lm: LoadedModel, strength: float) -> AbstractContextManager[MethodRecord]:
        return additive_context(self.name, strength, add_steering(
            lm, self.vectors, layers=self.layers, alpha=strength, component=self.component,
            positions=self.positions))


@contextmanager
def additive_context(name: str, strength: float, steering: AbstractContextManager) -> Iterator[MethodRecord]:
    """Run a :func:`torsion.steer.add_steering` context and yield its record as a :class:`MethodRecord`."""
    with steering as inner:
        yield MethodRecord(name, strength, inner.layers, inner.alpha, inner.applied_norms, inner.component,
                           inner.positions, inner.phase)
