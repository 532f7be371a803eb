"""Angles between directions (methods.md, "Notation and conventions").

Angles come from the **signed** cosine: ``θ = degrees(arccos(clip(cos, -1, 1)))``.

Example::

    adjacent_angles(vectors)            # [n_layers - 1]: angle(v_l, v_{l+1})
    random_angle_reference(896)         # (90.0, 1.914...): two unrelated directions
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cosine(a: Tensor, b: Tensor, dim: int = -1) -> Tensor:
    """Signed cosine along ``dim`` in float64; zero vectors give 0."""
    a, b = a.double(), b.double()
    denominator = (a.norm(dim=dim) * b.norm(dim=dim)).clamp_min(1e-300)
    return (a * b).sum(dim) / denominator


def angle_from_cosine(cos: Tensor) -> Tensor:
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def angle_deg(a: Tensor, b: Tensor, dim: int = -1) -> Tensor:
    """Angle in degrees from the signed cosine, float64, broadcasting like ``a * b``."""
    return angle_from_cosine(cosine(a, b, dim))


def adjacent_angles(vectors: Tensor) -> Tensor:
    """``θ_l = angle(v_l, v_{l+1})`` for ``vectors`` ``[..., n_layers, d_model]`` → ``[..., n_layers - 1]``."""
    return angle_deg(vectors[..., :-1, :], vectors[..., 1:, :])


def random_angle_reference(d_model: int) -> tuple[float, float]:
    """Mean and sd of the angle between two independent random directions in ``d_model`` dims.

    The cosine of two uniform random unit vectors has mean 0 and variance ``1/d``, so the
    angle sits at ``90° ± degrees(1/√d) = 90° ± 57.2958°/√d``.
    """
    return 90.0, math.degrees(1.0 / math.sqrt(d_model))
