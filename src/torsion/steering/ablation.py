"""``ablation``: directional ablation ``h' = h − β (h·v̂_l) v̂_l`` at every residual write.

The strength ``β`` multiplies the removed component: 1 is full ablation (methods.md,
"Steering"), 0 a no-op (no hook is installed), values in between a partial ablation. The
hooks are :func:`torsion.steer.ablate_direction`'s; an observer measures ``‖h' − h‖ =
β|h·v̂|`` at each block's attention and MLP writes (the embedding write is not recorded).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from torsion.capture import output_tensor
from torsion.errors import TorsionError
from torsion.models import LoadedModel
from torsion.steer import WRITES, ablate_direction
from torsion.steering.base import MethodRecord, SteeringMethod
from torsion.steering.registry import register


@register
@dataclass(frozen=True, eq=False)
class Ablation(SteeringMethod):
    """Ablate ``directions`` (``[d_model]``, one for every block, or ``[n_layers, d_model]``) with weight ``β``."""

    name = "ablation"
    replacement = True
    strength_name = "beta"
    directions: Tensor

    def _normalise(self) -> None:
        directions = getattr(self.directions, "directions", self.directions)
        directions = torch.as_tensor(directions).detach().float().cpu()
        if directions.ndim not in (1, 2) or not torch.isfinite(directions).all():
            raise TorsionError(f"ablation directions have shape {list(directions.shape)} or non-finite values; "
                               "pass a finite [d_model] or [n_layers, d_model] tensor")
        object.__setattr__(self, "directions", directions)

    d_model = property(lambda self: self.directions.shape[-1])
    n_layers_needed = property(lambda self: self.directions.shape[0] if self.directions.ndim == 2 else 0)
    steered_layers = property(lambda self: ())

    def validate(self, lm: LoadedModel) -> None:
        super().validate(lm)
        if self.directions.ndim == 2 and self.directions.shape[0] != lm.n_layers:
            raise TorsionError(f"ablation directions cover {self.directions.shape[0]} blocks but the model has "
                               f"{lm.n_layers}; pass [d_model] or one direction per block of this model")

    def search_range(self, objective: str) -> tuple[float, float]:
        """``β ∈ [0, 1]`` for either objective (none to full ablation)."""
        return 0.0, 1.0

    def block_weights(self, lm: LoadedModel, strength: float) -> list[float]:
        """The share removed at each block, ``[n_layers]``."""
        return [strength] * lm.n_layers

    def unit_source(self) -> Tensor:
        """What :func:`ablate_direction` normalises: ``[d_model]`` or ``[n_layers, d_model]``."""
        return self.directions

    def writes(self) -> tuple[str, ...]:
        """The residual writes ablated (:data:`torsion.steer.WRITES`): every one."""
        return WRITES

    def _context(self, lm: LoadedModel, strength: float) -> AbstractContextManager[MethodRecord]:
        return ablation_context(lm, self.name, strength, self.unit_source(), self.block_weights(lm, strength),
                                writes=self.writes())


@contextmanager
def ablation_context(lm: LoadedModel, name: str, strength: float, directions: Tensor,
                     weights: Sequence[float], writes: Sequence[str] = WRITES) -> Iterator[MethodRecord]:
    """:func:`ablate_direction` with per-block ``weights`` at ``writes``, and the observer that records ``‖h' − h‖``."""
    layers = tuple(range(lm.n_layers))
    components = "+".join(w for w in writes if w != "embed")
    record = MethodRecord(name, strength, layers, tuple(map(float, weights)), (0.0,) * len(layers), components,
                          "all", replacement=True)
    with ablate_direction(lm, directions, weight=list(weights), writes=writes) as units:
        handles: list[RemovableHandle] = []

        def make_observer(index: int, unit: Tensor, w: float):
            def hook(_module: torch.nn.Module, _inputs: tuple, output: Any) -> None:
                hidden = output_tensor(output)  # runs before the ablation hook: the raw write
                record.observe(index, (w * (hidden.float() @ unit.to(hidden.device)))[..., None])
            return hook

        try:
            for layer, w in enumerate(weights):
                if w == 0.0:
                    continue
                for module in (getattr(lm.layout, part)[layer] for part in ("attn", "mlp") if part in writes):
                    handles.append(module.register_forward_hook(make_observer(layer, units[layer], w), prepend=True))
            yield record
        finally:
            for handle in handles:
                handle.remove()
