"""``weighted-ablation``: directional ablation scaled per block by a kernel ``w(l)``, as heretic does.

The kernel (methods.md, "Comparing steering methods") peaks at ``peak_weight`` at block
``peak_position`` (fractional allowed) and falls linearly to ``floor`` at distance
``width``; beyond ``width`` it is 0 (the block is not touched)::

    w(l) = peak_weight + (|l − peak_position| / width) · (floor − peak_weight)   if |l − peak_position| ≤ width
    w(l) = 0                                                                       otherwise

The strength multiplies the kernel: block ``l`` removes ``strength · w(l)`` of the component
along its direction. ``direction_index`` ``None`` ablates each block's own ``v̂_l``; a number
``i`` ablates one direction everywhere, ``normalize(lerp(v_⌊i⌋, v_⌊i⌋+1, i − ⌊i⌋))`` (block
indexing; heretic's index is shifted by one because its row 0 is the embedding).

``components`` picks the writes ablated: ``attn+mlp`` (default: the embedding, every attention
and MLP output, as plain ablation), ``attn`` (attention outputs only, heretic's ``o_proj``) or
``mlp`` (MLP outputs only, heretic's ``down_proj``); the embedding is edited only with
``attn+mlp``, with weight ``w(0)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from torsion.errors import TorsionError
from torsion.models import LoadedModel
from torsion.steering.ablation import Ablation
from torsion.steering.base import as_matrix
from torsion.steering.registry import register

COMPONENTS = {"attn+mlp": ("embed", "attn", "mlp"), "attn": ("attn",), "mlp": ("mlp",)}  # name -> residual writes


def kernel_weights(n_layers: int, *, peak_weight: float, peak_position: float, width: float,
                   floor: float) -> list[float]:
    """``w(l)`` for ``l = 0 … n_layers-1`` (see the module docstring)."""
    if not width > 0:
        raise TorsionError(f"weighted-ablation width is {width}; pass a positive number of blocks")
    weights = []
    for layer in range(n_layers):
        distance = abs(layer - peak_position)
        weights.append(peak_weight + distance / width * (floor - peak_weight) if distance <= width else 0.0)
    return weights


@register
@dataclass(frozen=True, eq=False)
class WeightedAblation(Ablation):
    """Ablation with the heretic kernel; ``directions`` is ``[n_layers, d_model]``."""

    name = "weighted-ablation"
    peak_weight: float = 1.0
    peak_position: float = 0.0
    width: float = 1.0
    floor: float = 0.0
    direction_index: float | None = None
    components: str = "attn+mlp"

    def _normalise(self) -> None:
        if self.components not in COMPONENTS:
            raise TorsionError(f"weighted-ablation components {self.components!r}; choose "
                               f"{', '.join(COMPONENTS)}")
        object.__setattr__(self, "directions", as_matrix(self.directions, "weighted-ablation directions"))
        for key in ("peak_weight", "peak_position", "width", "floor"):
            value = float(getattr(self, key))
            if not math.isfinite(value):
                raise TorsionError(f"weighted-ablation {key} is {value}; pass a finite number")
            object.__setattr__(self, key, value)
        kernel_weights(1, peak_weight=self.peak_weight, peak_position=self.peak_position, width=self.width,
                       floor=self.floor)
        if self.direction_index is not None:
            index = float(self.direction_index)
            if not 0 <= index <= self.directions.shape[0] - 1:
                raise TorsionError(f"direction_index {index} is outside 0..{self.directions.shape[0] - 1}; "
                                   "pass a block index (fractions interpolate) or None for per-block directions")
            object.__setattr__(self, "direction_index", index)

    def block_weights(self, lm: LoadedModel, strength: float) -> list[float]:
        return [strength * w for w in kernel_weights(lm.n_layers, peak_weight=self.peak_weight,
                                                     peak_position=self.peak_position, width=self.width,
                                                     floor=self.floor)]

    def writes(self) -> tuple[str, ...]:
        return COMPONENTS[self.components]

    def unit_source(self) -> Tensor:
        if self.direction_index is None:
            return self.directions
        low = int(math.floor(self.direction_index))
        high = min(low + 1, self.directions.shape[0] - 1)
        mixed = torch.lerp(self.directions[low].double(), self.directions[high].double(), self.direction_index - low)
        return (mixed / torch.linalg.vector_norm(mixed)).float()
