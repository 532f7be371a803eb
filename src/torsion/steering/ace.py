"""``ace``: affine concept editing, ``h' = h − ((h − μ)·v̂) v̂ + α v̂`` (methods.md).

``μ`` is the complied (reference) mean at the block and ``v̂`` the unit direction: the
activation's coordinate along ``v̂``, measured from ``μ``, is set to ``α``. With mixing ``β``
(default 1) the coordinate moves the share ``β`` of the way, ``h' = h + β(α − (h − μ)·v̂) v̂``,
so ``β = 0`` is a no-op; ACE is the two-knot special case of a spline.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torsion.errors import TorsionError
from torsion.models import LoadedModel
from torsion.steering.base import MethodRecord, SteeringMethod, as_matrix
from torsion.steering.hooks import Transform, block_device, replace_steering
from torsion.steering.registry import register


def ace_transform(unit: Tensor, mean: Tensor, alpha: float, beta: float) -> Transform:
    """``h ↦ h + β(α − (h − μ)·v̂) v̂`` and ``h' − h``; ``unit`` and ``mean`` are ``[d_model]`` float32 on the model's
    device."""
    target = alpha + float(mean.double() @ unit.double())  # α + μ·v̂: the coordinate h·v̂ is moved towards
    beta_unit = beta * unit

    def transform(h: Tensor) -> tuple[Tensor, Tensor]:
        delta = (target - h @ unit)[..., None] * beta_unit
        return h + delta, delta
    return transform


@register
@dataclass(frozen=True, eq=False)
class Ace(SteeringMethod):
    """ACE on chosen blocks; ``vectors`` and ``means`` are ``[n_layers, d_model]``."""

    name = "ace"
    replacement = True
    vectors: Tensor
    means: Tensor
    layers: tuple[int, ...]
    beta: float = 1.0
    component: str = "resid"
    positions: str = "last"

    def _normalise(self) -> None:
        object.__setattr__(self, "vectors", as_matrix(self.vectors, "ace vectors"))
        object.__setattr__(self, "means", as_matrix(self.means, "ace means"))
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        object.__setattr__(self, "beta", float(self.beta))
        if self.vectors.shape != self.means.shape:
            raise TorsionError(f"ace vectors {list(self.vectors.shape)} and means {list(self.means.shape)} differ "
                               "in shape; pass both for the same blocks of the same model")
        if not self.layers:
            raise TorsionError("ace needs at least one layer; pass layers=[...]")
        for layer in self.layers:
            if 0 <= layer < self.vectors.shape[0] and not torch.linalg.vector_norm(self.vectors[layer]) > 0:
                raise TorsionError(f"ace vector at block {layer} is zero; steer blocks with a non-zero direction")

    d_model = property(lambda self: self.vectors.shape[1])
    n_layers_needed = property(lambda self: self.vectors.shape[0])
    steered_layers = property(lambda self: self.layers)

    def search_range(self, objective: str) -> tuple[float, float]:
        """In units of ``n``, the mean ``‖v_l‖`` over the steered blocks (``α = ‖v‖`` puts an MD coordinate on the
        refused mean, 0 on the complied mean): ``[−n, n]`` to comply, ``[0, 2n]`` to refuse."""
        n = float(torch.linalg.vector_norm(self.vectors[list(self.layers)].double(), dim=1).mean())
        return (-n, n) if objective == "comply" else (0.0, 2.0 * n)

    def _context(self, lm: LoadedModel, strength: float) -> AbstractContextManager[MethodRecord]:
        record = MethodRecord(self.name, strength, self.layers, (strength,) * len(self.layers),
                              (abs(self.beta * strength),) * len(self.layers), self.component, self.positions,
                              replacement=True)
        transforms = []
        for layer in self.layers if self.beta != 0 else ():  # β = 0: no hook at all
            device = block_device(lm, self.component, layer)
            v = self.vectors[layer].double()
            unit = (v / torch.linalg.vector_norm(v)).float().to(device)
            transforms.append(ace_transform(unit, self.means[layer].to(device), strength, self.beta))
        return replace_steering(lm, transforms, record)


def complied_means(run_dir: Any, component: str = "resid") -> Tensor:
    """``μ`` for ACE: the mean activation of the run's complied train rows, ``[n_layers, d_model]``."""
    from torsion.capture import load_activations
    from torsion.judge.base import is_complied
    from torsion.manifold.knots import behaviour_labels
    from torsion.runs import fit_rows, labelled_prompts
    from torsion.store import RunDir

    run = RunDir(run_dir)
    prompts, responses = labelled_prompts(run)
    rows = fit_rows(prompts, responses)
    _, scores = behaviour_labels([prompts[i] for i in rows], [responses[i] for i in rows])
    complied = [i for i, score in zip(rows, scores) if is_complied(score)]
    if not complied:
        raise TorsionError(f"{run.root} has no complied train rows; ACE needs a complied mean")
    tensors, _ = load_activations(run.activations_path)
    if component not in tensors:
        raise TorsionError(f"activations have no component {component!r}; choose one of {', '.join(sorted(tensors))}")
    return tensors[component][complied].double().mean(0).float()
