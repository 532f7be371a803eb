"""``spline-a``: per-block spline steering (methods.md, "Manifold (spline) steering", variant A).

At each steered block, ``z = U(h − μ)`` and ``h' = h + β Uᵀ(s(t) − z)``: the subspace
coordinates move the share ``β`` of the way to the curve's point at ``t`` (``β = 1`` puts
them on it); the orthogonal complement is kept. The strength is ``t`` (0 = the refuse end,
1 = the comply end). A ``t`` outside the coherent range (the manifold file's last coherent
``t`` per side, else the outer knots) is refused unless ``allow_extrapolation``.

Example::

    method = SplineA.from_manifold(load_manifold("runs/quick/manifold.safetensors"), layers=[10, 12])
    with method.apply(lm, 0.8) as record: ...
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from torsion.errors import TorsionError
from torsion.manifold.file import Manifold
from torsion.manifold.fit import make_curve
from torsion.models import LoadedModel
from torsion.steering.base import MethodRecord
from torsion.steering.registry import register
from torsion.steering.spline_common import SplineMethod, manifold_provenance, check_t, normalise_common, subspace_context


@register
@dataclass(frozen=True, eq=False)
class SplineA(SplineMethod):
    """Spline A on ``layers``.

    ``basis`` ``[n, k, d]``, ``mean`` ``[n, d]`` and ``knots`` ``[n, n_knots, k]`` are aligned
    with ``layers``; ``knots_t`` is ``[n_knots]``.
    """

    name = "spline-a"
    layers: tuple[int, ...]
    basis: Tensor
    mean: Tensor
    knots: Tensor
    knots_t: Tensor

    def _normalise(self) -> None:
        normalise_common(self)
        for key in ("basis", "mean", "knots"):
            object.__setattr__(self, key, torch.as_tensor(getattr(self, key)).detach().float().cpu())
        n = len(self.layers)
        if (self.basis.ndim != 3 or self.mean.shape != (n, self.basis.shape[2])
                or self.knots.shape != (n, self.knots_t.numel(), self.basis.shape[1]) or self.basis.shape[0] != n):
            raise TorsionError(f"spline-a tensors disagree: basis {list(self.basis.shape)}, mean "
                               f"{list(self.mean.shape)}, knots {list(self.knots.shape)} for {n} layers; "
                               "refit the manifold")

    def at_layers(self, layers: Sequence[int]) -> SplineA:
        """This spline on a subset of its ``layers`` (the tensors sliced to match)."""
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise TorsionError(f"spline-a has no fit for block {missing[0]}; it covers {list(self.layers)}, "
                               "refit the manifold with --layers")
        rows = torch.tensor([self.layers.index(layer) for layer in layers])
        return dataclasses.replace(self, layers=tuple(int(layer) for layer in layers), basis=self.basis[rows],
                                   mean=self.mean[rows], knots=self.knots[rows])

    d_model = property(lambda self: self.basis.shape[2])
    n_layers_needed = property(lambda self: max(self.layers) + 1)

    @classmethod
    def from_manifold(cls, manifold: Manifold, layers: Sequence[int] | None = None, **params: Any) -> SplineA:
        """Spline A on ``layers`` (default every block the file has) of a loaded manifold file."""
        chosen = tuple(layers) if layers is not None else tuple(sorted(manifold.a))
        missing = [layer for layer in chosen if layer not in manifold.a]
        if not chosen or missing:
            raise TorsionError(f"the manifold file has spline A for blocks {sorted(manifold.a)}, not {missing or '[]'}; "
                               "pass fitted --layers or refit with `torsion manifold fit --variant a`")
        fits = [manifold.a[layer] for layer in chosen]
        params.setdefault("t_range", manifold.t_range())
        params.setdefault("smoothing", float(manifold.meta.get("smoothing", 0.0)))
        params.setdefault("knot_weights", fits[0].knot_weights)
        return cls(chosen, torch.stack([f.basis for f in fits]), torch.stack([f.mean for f in fits]),
                   torch.stack([f.knots for f in fits]), fits[0].knots_t, meta=manifold_provenance(manifold), **params)

    def targets(self, t: float) -> Tensor:
        """``s_l(t)`` for each steered block, ``[n, k]``."""
        knots_t = self.knots_t.double().numpy()
        return torch.stack([torch.from_numpy(make_curve(knots_t, self.knots[i].double().numpy(), self.smoothing,
                                                       self.knot_weights)(t))
                            for i in range(len(self.layers))]).float()

    def _context(self, lm: LoadedModel, strength: float) -> AbstractContextManager[MethodRecord]:
        check_t(self.name, strength, self.t_range, self.allow_extrapolation)
        targets = self.targets(strength)
        return subspace_context(lm, self, strength, [self.basis[i] for i in range(len(self.layers))],
                                list(self.mean), targets)
